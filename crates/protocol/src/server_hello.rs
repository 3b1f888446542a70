//! What a TLS 1.3 server chose — cipher suite and key exchange group — read from its
//! ServerHello as a QUIC client receives it: handshake messages without TLS records, in the
//! order of the Initial packets' CRYPTO frames. Sans-IO: [`ServerHelloReader`] is fed those
//! bytes as they arrive (a ServerHello with an ML-KEM key share spans two packets), skips a
//! HelloRetryRequest (the server asking for another group; the real ServerHello follows it),
//! and keeps at most [`MAX_SERVER_HELLO`] bytes.
//!
//! Written by hand because quinn keeps its rustls connection to itself: the agent's QUIC
//! session passes the bytes to rustls unchanged and shows them to this reader too (rustls
//! decides the handshake; this only reports it).

/// The most bytes read for a ServerHello and a HelloRetryRequest before it: an
/// X25519MLKEM768 ServerHello is about 1,200 bytes.
pub const MAX_SERVER_HELLO: usize = 8 * 1024;

/// What the server chose, as IANA numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The cipher suite (`0x1302`: TLS_AES_256_GCM_SHA384).
    pub cipher_suite: u16,
    /// The key exchange group of its key share (`0x11ec`: X25519MLKEM768).
    pub group: u16,
}

/// Reads the first ServerHello out of a server's handshake messages; see the module docs.
#[derive(Debug, Default)]
pub struct ServerHelloReader {
    buffer: Vec<u8>,
    /// Bytes taken in all (a HelloRetryRequest read is dropped from `buffer`, not from this).
    taken: usize,
    outcome: Option<Option<Negotiated>>,
}

const SERVER_HELLO: u8 = 2;
const KEY_SHARE: u16 = 0x0033;
/// A HelloRetryRequest is a ServerHello with this random (RFC 8446 §4.1.3).
const HELLO_RETRY_REQUEST_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

impl ServerHelloReader {
    /// Takes the next bytes of the server's handshake messages.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.outcome.is_some() {
            return;
        }
        let room = MAX_SERVER_HELLO.saturating_sub(self.taken);
        let taken = &bytes[..bytes.len().min(room)];
        self.taken += taken.len();
        self.buffer.extend_from_slice(taken);
        loop {
            let Some(header) = self.buffer.get(..4) else { return };
            let length =
                usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            if header[0] != SERVER_HELLO
                || self.taken - self.buffer.len() + 4 + length > MAX_SERVER_HELLO
            {
                return self.finish(None);
            }
            let Some(body) = self.buffer.get(4..4 + length) else { return };
            match read_server_hello(body) {
                Some(Hello::RetryRequest) => drop(self.buffer.drain(..4 + length)),
                Some(Hello::Server(negotiated)) => return self.finish(Some(negotiated)),
                None => return self.finish(None),
            }
        }
    }

    /// What the server chose, once its ServerHello was read; `None` before, or when the bytes
    /// were not one.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.outcome.flatten()
    }

    fn finish(&mut self, outcome: Option<Negotiated>) {
        self.outcome = Some(outcome);
        self.buffer = Vec::new();
    }
}

enum Hello {
    RetryRequest,
    Server(Negotiated),
}

/// A ServerHello's body (RFC 8446 §4.1.3): version, random, session id, suite, compression,
/// extensions — among them the key share's group.
fn read_server_hello(body: &[u8]) -> Option<Hello> {
    let mut cursor = body;
    take(&mut cursor, 2)?; // legacy_version
    let random = take(&mut cursor, 32)?;
    if random == HELLO_RETRY_REQUEST_RANDOM {
        return Some(Hello::RetryRequest);
    }
    let session_id = usize::from(take(&mut cursor, 1)?[0]);
    take(&mut cursor, session_id)?;
    let cipher_suite = u16_of(take(&mut cursor, 2)?);
    take(&mut cursor, 1)?; // legacy_compression_method
    let extensions = usize::from(u16_of(take(&mut cursor, 2)?));
    let mut extensions = take(&mut cursor, extensions)?;
    while !extensions.is_empty() {
        let kind = u16_of(take(&mut extensions, 2)?);
        let length = usize::from(u16_of(take(&mut extensions, 2)?));
        let data = take(&mut extensions, length)?;
        if kind == KEY_SHARE {
            let group = u16_of(data.get(..2)?);
            return Some(Hello::Server(Negotiated { cipher_suite, group }));
        }
    }
    None
}

fn take<'a>(cursor: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if cursor.len() < n {
        return None;
    }
    let (head, rest) = cursor.split_at(n);
    *cursor = rest;
    Some(head)
}

fn u16_of(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ServerHello message (type, length, body) with `random`, `suite` and a key share of
    /// `group` with `share_len` bytes of key, after another extension.
    fn server_hello(random: [u8; 32], suite: u16, group: u16, share_len: usize) -> Vec<u8> {
        server_hello_with(KEY_SHARE, random, suite, group, share_len)
    }

    /// The same with the key share under extension number `key_share_type`.
    fn server_hello_with(
        key_share_type: u16,
        random: [u8; 32],
        suite: u16,
        group: u16,
        share_len: usize,
    ) -> Vec<u8> {
        let mut key_share = group.to_be_bytes().to_vec();
        if share_len > 0 {
            key_share.extend(u16::try_from(share_len).expect("small").to_be_bytes());
            key_share.extend(vec![0xab; share_len]);
        }
        let mut extensions = vec![0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]; // supported_versions
        extensions.extend(key_share_type.to_be_bytes());
        extensions.extend(u16::try_from(key_share.len()).expect("small").to_be_bytes());
        extensions.extend(key_share);
        let mut body = vec![0x03, 0x03];
        body.extend(random);
        body.extend([4, 1, 2, 3, 4]); // a session id echoed
        body.extend(suite.to_be_bytes());
        body.push(0);
        body.extend(u16::try_from(extensions.len()).expect("small").to_be_bytes());
        body.extend(extensions);
        let length = u32::try_from(body.len()).expect("small").to_be_bytes();
        let mut message = vec![SERVER_HELLO, length[1], length[2], length[3]];
        message.extend(body);
        message
    }

    #[test]
    fn reads_the_suite_and_group_in_pieces_of_any_size() {
        let hello = server_hello([7; 32], 0x1302, 0x11ec, 1120);
        let mut then_more = hello.clone();
        then_more.extend([8, 0, 0, 2, 0, 0]); // EncryptedExtensions follows in another space
        for piece in [1, 2, 3, 100, 1200, then_more.len()] {
            let mut reader = ServerHelloReader::default();
            for chunk in then_more.chunks(piece) {
                reader.feed(chunk);
            }
            let expected = Negotiated { cipher_suite: 0x1302, group: 0x11ec };
            assert_eq!(reader.negotiated(), Some(expected), "pieces of {piece}");
        }
    }

    #[test]
    fn skips_a_hello_retry_request_for_the_server_hello_after_it() {
        let mut bytes = server_hello(HELLO_RETRY_REQUEST_RANDOM, 0x1301, 0x0017, 0);
        bytes.extend(server_hello([9; 32], 0x1301, 0x0017, 65));
        let mut reader = ServerHelloReader::default();
        reader.feed(&bytes);
        assert_eq!(reader.negotiated(), Some(Negotiated { cipher_suite: 0x1301, group: 0x0017 }));
    }

    #[test]
    fn anything_else_is_no_answer_and_nothing_kept() {
        let not_a_server_hello = [1, 0, 0, 4, 1, 2, 3, 4];
        let mut cut = server_hello([7; 32], 0x1302, 0x001d, 32);
        cut.truncate(60);
        cut[3] = 56; // says it is whole: the key share is cut off
        let oversized = [SERVER_HELLO, 0x01, 0x00, 0x00]; // 64 KiB announced
        let no_key_share = server_hello_with(0x0029, [7; 32], 0x1302, 0x001d, 32);
        for bytes in [&not_a_server_hello[..], &cut, &oversized, &no_key_share, &[0xff; 20_000]] {
            let mut reader = ServerHelloReader::default();
            reader.feed(bytes);
            assert_eq!(reader.negotiated(), None);
            assert!(reader.buffer.len() <= MAX_SERVER_HELLO);
        }
        let mut endless = ServerHelloReader::default();
        for _ in 0..100 {
            endless.feed(&[SERVER_HELLO, 0x00, 0x10, 0x00]);
        }
        assert!(endless.buffer.len() <= MAX_SERVER_HELLO);
    }
}
