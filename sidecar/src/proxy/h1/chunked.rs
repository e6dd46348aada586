//! Chunked bodies passed through unchanged, their framing checked strictly ([`Chunks`]).

/// Chunked trailers larger than this end the exchange (they are passed through, not kept).
pub(super) const MAX_TRAILERS: usize = 64 << 10;

/// Finds where a chunked body ends (RFC 9112 §7.1) in bytes that are passed through unchanged, so
/// the framing is checked strictly: only well-formed chunks reach the agent.
#[derive(Default)]
pub(super) struct Chunks {
    state: ChunkState,
    /// The current chunk's size, then what is left of it.
    size: u64,
    /// Hex digits of the current size line.
    digits: u8,
    trailer_bytes: usize,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// A chunk extension, up to its CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk: a trailer line or the final CRLF.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// How many of `bytes` belong to the body, and whether the body ends there.
    /// `on_data` gets the ranges of `bytes` that are chunk data.
    pub(super) fn scan(
        &mut self,
        bytes: &[u8],
        mut on_data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<(usize, bool), ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() && self.state != Done {
            if self.state == Data {
                let take = self.size.min((bytes.len() - i) as u64);
                on_data(i..i + take as usize);
                i += take as usize;
                self.size -= take;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size, b) if b.is_ascii_hexdigit() => {
                    // 15 hex digits hold any real size; more could overflow.
                    if self.size >> 56 != 0 {
                        return Err(());
                    }
                    self.digits = self.digits.saturating_add(1);
                    self.size = self.size << 4 | u64::from((b as char).to_digit(16).unwrap_or(0));
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => Extension,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(()),
                (Extension, _) => Extension,
                (SizeLf, b'\n') if self.size == 0 => TrailerStart,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.digits = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, b'\n') => return Err(()),
                (TrailerStart | Trailer, _) => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(());
                    }
                    Trailer
                }
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(()),
            };
        }
        Ok((i, self.state == Done))
    }
}
