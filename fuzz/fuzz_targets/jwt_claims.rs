//! Any text where a JWT is expected (a server's access token): reading its claims never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_credentials_core::source::token_response::jwt_claims;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = jwt_claims(text);
    }
});
