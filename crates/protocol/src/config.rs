//! Codec configuration: size caps and the compression policy.

/// Limits and compression settings shared by encoder and decoder.
///
/// Both caps are enforced before work is done: a frame longer than
/// `max_frame_bytes` is rejected before its header is read, and inflation
/// stops as soon as output would pass `max_payload_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecConfig {
    /// Largest frame (header + payload as sent) accepted or produced.
    /// Default 1 MiB: ample for chat text plus metadata, small enough that
    /// a burst of maximal frames cannot exhaust memory.
    pub max_frame_bytes: usize,
    /// Largest payload after decompression. Default 1 MiB; this is what
    /// stops a deflate bomb (1 KiB of DEFLATE can claim 1 MiB of output).
    pub max_payload_bytes: usize,
    /// Payloads longer than this many bytes are compressed when that makes
    /// them smaller. Default 1 KiB: below it DEFLATE rarely pays for the
    /// CPU. `usize::MAX` disables compression.
    pub compress_threshold: usize,
    /// DEFLATE level 0..=9. Default 1 (fastest): chat text compresses
    /// nearly as well at 1 as at 6 for a fraction of the CPU, and a
    /// broadcast is compressed once for all recipients anyway.
    pub compression_level: u32,
}

/// 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// 1 KiB.
pub const DEFAULT_COMPRESS_THRESHOLD: usize = 1024;

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_payload_bytes: DEFAULT_MAX_FRAME_BYTES,
            compress_threshold: DEFAULT_COMPRESS_THRESHOLD,
            compression_level: 1,
        }
    }
}
