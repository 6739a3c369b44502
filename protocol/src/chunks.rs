//! Byte streams carried in frames (the copy-in and copy-out tars): a writer that cuts a stream into
//! chunks of at most [`MAX_CHUNK`] bytes for the sender to frame, and a reader that joins the chunks a
//! [`ChunkSource`] takes out of frames back into a stream.

use std::io::{self, Read, Write};

use crate::MAX_CHUNK;

/// Hands each chunk of at most [`MAX_CHUNK`] bytes to `send`; `flush` sends a partial last one.
pub struct ChunkWriter<F> {
    send: F,
    buf: Vec<u8>,
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> ChunkWriter<F> {
    pub fn new(send: F) -> Self {
        ChunkWriter {
            send,
            buf: Vec::with_capacity(MAX_CHUNK),
        }
    }
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Write for ChunkWriter<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(MAX_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let data = std::mem::replace(&mut self.buf, Vec::with_capacity(MAX_CHUNK));
            (self.send)(data)?;
        }
        Ok(())
    }
}

/// Where a [`ChunkReader`] gets its chunks: the next one, or `None` at the end of the stream.
pub trait ChunkSource {
    fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>>;
}

/// The stream of a [`ChunkSource`]'s chunks. After the end, reads return 0.
pub struct ChunkReader<S> {
    pub source: S,
    chunk: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl<S: ChunkSource> ChunkReader<S> {
    pub fn new(source: S) -> Self {
        ChunkReader {
            source,
            chunk: Vec::new(),
            pos: 0,
            ended: false,
        }
    }
}

impl<S: ChunkSource> Read for ChunkReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.chunk.len() {
                let n = buf.len().min(self.chunk.len() - self.pos);
                buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.ended || buf.is_empty() {
                return Ok(0);
            }
            match self.source.next_chunk()? {
                Some(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                None => self.ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;

    struct Chunks(std::vec::IntoIter<Vec<u8>>);

    impl ChunkSource for Chunks {
        fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
            Ok(self.0.next())
        }
    }

    #[test]
    fn a_stream_cut_into_chunks_reads_back_whole() {
        let data: Vec<u8> = (0..MAX_CHUNK * 2 + 100).map(|i| i as u8).collect();
        let mut chunks = Vec::new();
        let mut w = ChunkWriter::new(|c: Vec<u8>| {
            chunks.push(c);
            Ok(())
        });
        w.write_all(&data).unwrap();
        w.flush().unwrap();
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_CHUNK, MAX_CHUNK, 100]);
        // empty chunks are skipped, and the end is sticky
        chunks.insert(1, Vec::new());
        let mut r = ChunkReader::new(Chunks(chunks.into_iter()));
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(r.read(&mut [0u8; 4]).unwrap(), 0);
    }
}
