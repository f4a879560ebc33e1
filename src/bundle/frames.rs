//! The default export encoding: the bundle's tar stream as a sequence of zstd frames that reuses
//! the store's work instead of redoing it. A chunk the store keeps zstd-compressed is already a
//! complete zstd frame and is copied as is; a chunk the store found incompressible goes into raw
//! frames (zstd's stored blocks) without a compression attempt; everything else (tar headers,
//! padding, redacted copies) is gathered and compressed here. Any zstd reader decodes
//! concatenated frames as one stream (RFC 8878, section 3.1), nexo-memory-snapshot's included,
//! so the format is unchanged; what changes is that exporting costs a copy of the packs rather
//! than a compression of every byte (store-format.md, "Bundles").

use std::io::{self, Write};

use crate::zstd_frames::{Block, MAGIC, MAX_BLOCK};

/// Compressible bytes gathered before they are compressed as one frame.
const GATHER: usize = 1 << 20;

pub(crate) struct FrameWriter<W: Write> {
    out: W,
    level: i32,
    pending: Vec<u8>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl<W: Write> FrameWriter<W> {
    pub(crate) fn new(out: W, level: i32) -> Self {
        Self {
            out,
            level,
            pending: Vec::with_capacity(GATHER),
            compressor: None,
        }
    }

    /// Bytes worth compressing (headers, small files, redacted copies).
    pub(crate) fn data(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(GATHER - self.pending.len());
            self.pending.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.pending.len() >= GATHER {
                self.flush_pending()?;
            }
        }
        Ok(())
    }

    /// Bytes known not to compress: stored in raw frames.
    pub(crate) fn incompressible(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.flush_pending()?;
        raw_frames(&mut self.out, bytes)
    }

    /// A complete zstd frame (a chunk as the store keeps it), copied unchanged.
    pub(crate) fn frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if !frame.starts_with(&MAGIC) {
            return Err(io::Error::other("a stored chunk is not a zstd frame"));
        }
        self.flush_pending()?;
        self.out.write_all(frame)
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.compressor.is_none() {
            let mut c = zstd::bulk::Compressor::new(self.level)?;
            c.include_checksum(true)?;
            self.compressor = Some(c);
        }
        let compressed = match self.compressor.as_mut() {
            Some(c) => c.compress(&self.pending)?,
            None => Vec::new(),
        };
        if !compressed.is_empty() && compressed.len() < self.pending.len() {
            self.out.write_all(&compressed)?;
        } else {
            raw_frames(&mut self.out, &self.pending)?;
        }
        self.pending.clear();
        Ok(())
    }

    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.flush_pending()?;
        Ok(self.out)
    }
}

/// `bytes` as raw frames, whose length depends on `bytes`' length only: a record a one-pass
/// export writes first and overwrites at the end.
pub(crate) fn raw(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 1024 + 16);
    // A Vec takes every write.
    let _ = raw_frames(&mut out, bytes);
    out
}

/// Frames of one raw block each (of at most [`MAX_BLOCK`] bytes).
fn raw_frames(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    for piece in bytes.chunks(MAX_BLOCK) {
        let mut header = Vec::with_capacity(16);
        crate::zstd_frames::frame_header(&mut header, piece.len() as u64);
        header.extend_from_slice(&crate::zstd_frames::block_header(
            Block::Raw,
            piece.len(),
            true,
        ));
        out.write_all(&header)?;
        out.write_all(piece)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn mixed_frames_decode_as_one_stream() {
        let text = b"memory notes compress well. ".repeat(5000);
        let mut noise = vec![0u8; 300_000];
        let mut s = 0x9e37_79b9_7f4a_7c15_u64;
        for b in noise.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *b = s as u8;
        }
        let chunk = b"a stored chunk, already compressed ".repeat(100);
        let stored = zstd::bulk::compress(&chunk, 3).expect("compress");
        let mut w = FrameWriter::new(Vec::new(), 3);
        w.data(&text).expect("data");
        w.incompressible(&noise).expect("raw");
        w.frame(&stored).expect("frame");
        for n in [0usize, 1, 255, 256, 65791, 65792, 131072] {
            w.incompressible(&noise[..n]).expect("raw sizes");
        }
        w.data(b"tail").expect("tail");
        let bytes = w.finish().expect("finish");
        let mut expected = text.clone();
        expected.extend_from_slice(&noise);
        expected.extend_from_slice(&chunk);
        for n in [0usize, 1, 255, 256, 65791, 65792, 131072] {
            expected.extend_from_slice(&noise[..n]);
        }
        expected.extend_from_slice(b"tail");
        let mut got = Vec::new();
        zstd::stream::read::Decoder::new(bytes.as_slice())
            .expect("decoder")
            .read_to_end(&mut got)
            .expect("decode");
        assert_eq!(got, expected);
        assert!(bytes.len() < expected.len(), "text was compressed");
        assert!(
            bytes.windows(stored.len()).any(|w| w == stored.as_slice()),
            "a stored frame is copied byte for byte"
        );
    }

    #[test]
    fn large_or_incompressible_gathered_bytes_and_bad_frames() {
        let mut noise = vec![0u8; 3 << 20];
        let mut s = 0x1234_5678_9abc_def1_u64;
        for b in noise.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *b = s as u8;
        }
        let mut w = FrameWriter::new(Vec::new(), 3);
        // More than one gathering's worth, and random: flushed as raw frames, not inflated.
        w.data(&noise).expect("data");
        assert!(
            w.frame(b"not a zstd frame").is_err(),
            "a non-frame is refused"
        );
        let bytes = w.finish().expect("finish");
        assert!(
            bytes.len() < noise.len() + noise.len() / 100,
            "{}",
            bytes.len()
        );
        let mut got = Vec::new();
        zstd::stream::read::Decoder::new(bytes.as_slice())
            .expect("decoder")
            .read_to_end(&mut got)
            .expect("decode");
        assert_eq!(got, noise);
    }
}
