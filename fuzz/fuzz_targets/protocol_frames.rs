//! The host/guest protocol's frames, as the host reads them from the guest: the non-blocking splitter
//! (`FrameBuffer`, fed in pieces of the input's choosing) and the blocking reader (`Message::read_from`,
//! over a stream that returns short reads) must agree on every message and on where the stream breaks,
//! and every message decoded must encode back to a frame that decodes to the same message.
//!
//! Input: one byte (the size of the pieces, less one), then the byte stream from the guest.

#![no_main]

use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use vmm_protocol::{FrameBuffer, Message, ReadError, MAX_PAYLOAD};

/// A reader that hands out at most `piece` bytes per read.
struct Trickle<'a> {
    data: &'a [u8],
    piece: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn check_round_trip(msg: &Message) {
    let frame = msg.encode();
    assert!(frame.len() >= 5);
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    assert_eq!(len, frame.len() - 5, "{}: length field", msg.name());
    assert!(
        len <= MAX_PAYLOAD + 64 * 1024,
        "{}: {len} bytes",
        msg.name()
    );
    let again = Message::decode(frame[4], &frame[5..]).expect("an encoded message decodes");
    assert_eq!(&again, msg);
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece) + 1;

    // The splitter, fed in pieces.
    let mut frames = FrameBuffer::new();
    let mut from_buffer = Vec::new();
    let mut buffer_error = false;
    'feed: for chunk in stream.chunks(piece) {
        frames.push(chunk);
        loop {
            match frames.next_message() {
                Ok(Some(msg)) => from_buffer.push(msg),
                Ok(None) => break,
                Err(_) => {
                    buffer_error = true;
                    break 'feed;
                }
            }
        }
    }

    // The blocking reader, over short reads.
    let mut reader = Trickle {
        data: stream,
        piece,
    };
    let mut from_reader = Vec::new();
    let reader_end = loop {
        match Message::read_from(&mut reader) {
            Ok(msg) => from_reader.push(msg),
            Err(e) => break e,
        }
    };

    assert_eq!(from_buffer, from_reader, "the two readers disagree");
    match reader_end {
        ReadError::Decode(_) => assert!(buffer_error, "only the reader saw a bad frame"),
        // The stream ended, between frames or inside one: the splitter is waiting for more.
        ReadError::Closed | ReadError::Io(_) => {
            assert!(!buffer_error, "only the splitter saw a bad frame")
        }
    }
    for msg in &from_reader {
        check_round_trip(msg);
    }
});
