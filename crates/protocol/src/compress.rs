//! Raw DEFLATE (RFC 1951, no zlib or gzip wrapper) with a hard output cap.
//!
//! Browsers speak the same format through
//! `DecompressionStream("deflate-raw")`.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::DecodeError;

/// Appends the DEFLATE form of `input` to `out`.
pub(crate) fn deflate(input: &[u8], level: u32, out: &mut Vec<u8>) {
    let mut c = Compress::new(Compression::new(level.min(9)), false);
    // Incompressible data grows by a few bytes per 16 KiB block.
    out.reserve(input.len() / 2 + 64);
    loop {
        let consumed = c.total_in() as usize;
        let status = c.compress_vec(&input[consumed..], out, FlushCompress::Finish);
        match status {
            Ok(Status::StreamEnd) => return,
            Ok(_) => out.reserve(out.capacity().max(64)),
            // Compressing an in-memory slice into a growing Vec has no
            // failure mode in miniz_oxide; keep the uncompressed form.
            Err(_) => {
                out.clear();
                return;
            }
        }
    }
}

/// The first `n` bytes `input` inflates to (fewer if it is shorter), or
/// `None` when it is not DEFLATE. Stops there: reading the start of a
/// large payload costs what the start costs.
pub(crate) fn inflate_prefix(input: &[u8], n: usize) -> Option<Vec<u8>> {
    let mut d = Decompress::new(false);
    let mut out: Vec<u8> = Vec::with_capacity(n);
    loop {
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(
                &input[in_before as usize..],
                &mut out,
                FlushDecompress::None,
            )
            .ok()?;
        if out.len() >= n || status == Status::StreamEnd {
            return Some(out);
        }
        if d.total_in() == in_before && d.total_out() == out_before {
            return None;
        }
    }
}

/// Inflates `input`, failing as soon as the output would exceed `cap`.
///
/// The output buffer starts small and grows by doubling, never past
/// `cap + 1` bytes, so a bomb costs at most the cap in memory.
pub(crate) fn inflate(input: &[u8], cap: usize) -> Result<Vec<u8>, DecodeError> {
    let mut d = Decompress::new(false);
    let limit = cap.saturating_add(1);
    // Not `clamp`: a cap under 256 (a Heartbeat's is 0) would panic it.
    let mut out: Vec<u8> = Vec::with_capacity(input.len().saturating_mul(4).max(256).min(limit));
    loop {
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let consumed = in_before as usize;
        let status = d
            .decompress_vec(&input[consumed..], &mut out, FlushDecompress::None)
            .map_err(|_| DecodeError::BadCompression)?;
        if out.len() > cap {
            return Err(DecodeError::PayloadTooLarge { max: cap });
        }
        if status == Status::StreamEnd {
            if d.total_in() as usize != input.len() {
                // Bytes after the final block: not one clean stream.
                return Err(DecodeError::BadCompression);
            }
            return Ok(out);
        }
        if out.len() < out.capacity() {
            // Output space was available: either progress was made and we
            // go again, or the input ended before the final block.
            if d.total_in() == in_before && d.total_out() == out_before {
                return Err(DecodeError::BadCompression);
            }
            continue;
        }
        if out.capacity() >= limit {
            return Err(DecodeError::PayloadTooLarge { max: cap });
        }
        let grow = out.capacity().min(limit - out.capacity());
        out.reserve_exact(grow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_cap() {
        let data = vec![b'a'; 100_000];
        let mut z = Vec::new();
        deflate(&data, 1, &mut z);
        assert!(z.len() < 1000);
        let got = inflate(&z, 100_000);
        assert_eq!(got.as_ref().map(Vec::len), Ok(data.len()));
        assert_eq!(
            inflate(&z, 99_999),
            Err(DecodeError::PayloadTooLarge { max: 99_999 })
        );
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut z = Vec::new();
        deflate(&data, 6, &mut z);
        for cut in [0, 1, z.len() / 2, z.len() - 1] {
            assert!(inflate(&z[..cut], 1 << 20).is_err(), "cut at {cut}");
        }
        let mut trailing = z.clone();
        trailing.push(0);
        assert_eq!(
            inflate(&trailing, 1 << 20),
            Err(DecodeError::BadCompression)
        );
        assert!(inflate(&[0xff; 64], 1 << 20).is_err());
    }
}
