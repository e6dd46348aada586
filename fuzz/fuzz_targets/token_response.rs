//! Any status and body from a token endpoint: never a panic, and a token the server put anywhere in
//! its answer never reaches the error message. Every `@@` in the input becomes a token-shaped
//! marker, so the fuzzer can place "tokens" wherever it finds new code paths.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_credentials_core::source::parse_token_response;

const MARKER: &str = "fuzzTOKEN0123456789abcdefSECRET";

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = 100 + u16::from_be_bytes(*status) % 500;
    let body = String::from_utf8_lossy(body).replace("@@", MARKER);
    match parse_token_response(status, body.as_bytes()) {
        Ok(token) => {
            let shown = format!("{token:?}");
            assert!(
                !shown.contains(MARKER),
                "Debug of a token response shows the token: {shown}"
            );
        }
        Err(e) => {
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(MARKER), "the error shows a token: {shown}");
        }
    }
});
