//! PDUs on a socket with as few copies as the kernel allows: the I/O half
//! of the PDU codec ([`super::pdu`] stays pure and keeps the framing rules).
//!
//! Reading: the header (BHS, AHS, header digest) goes through the
//! connection's read buffer ([`frameio::READ_BUFFER_BYTES`]); a data
//! segment is read by [`frameio::read_payload`] into its own vector, large
//! ones straight from the socket, with room for the internal protocol's
//! payload CRC, so a WRITE's data travels from the socket to the storage
//! client in the vector it was read into. The data digest is computed over
//! the segment where it lies.
//!
//! Writing: an [`Outbox`] collects the PDUs of one turn of the connection
//! loop; headers and small PDUs are encoded into one buffer, Data-In
//! payloads stay in the read reply's vector, and the batch leaves in one
//! gathered `writev` ([`frameio::Gather`]).
//!
//! Why: profiles of 128 KiB transfers (docs/iscsi.md, "Copies") showed the
//! session copying every payload two to four times (into each Data-In PDU,
//! into the send buffer; out of a 256 KiB read buffer that was zeroed per
//! read, into the command's buffer, into the write request).

use super::pdu::{self, Digests, Pdu};
use super::session::DataIn;
use crate::frameio::{self, Gather};
use std::ops::Range;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};

/// Spare room after a data segment read from the socket: the storage
/// client appends the internal protocol's 4-byte payload CRC to a write's
/// data where it lies (`tessera_wire::header::seal_payload`).
pub const PAYLOAD_SPARE_BYTES: usize = 4;

/// Largest header part: BHS, the largest AHS (255 words) and a digest.
const HEADER_BYTES_MAX: usize = pdu::BHS_BYTES + 255 * 4 + pdu::DIGEST_BYTES;

/// What reading one PDU gave.
#[derive(Debug)]
pub enum Read {
    Pdu(Pdu),
    /// Data digest mismatch: the header is good, so it can be rejected.
    BadData(Pdu),
    Closed,
    Error(String),
}

/// Reads whole PDUs from a stream.
pub struct Reader<R> {
    rd: BufReader<crate::busy_poll::Noted<R>>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(r: R) -> Reader<R> {
        Reader {
            rd: BufReader::with_capacity(frameio::READ_BUFFER_BYTES, crate::busy_poll::Noted(r)),
        }
    }

    /// The next PDU, its data segment at most `data_max` bytes.
    pub async fn next(&mut self, digests: Digests, data_max: usize) -> Read {
        match self.next_inner(digests, data_max).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Read::Closed,
            Err(e) => Read::Error(e.to_string()),
        }
    }

    async fn next_inner(&mut self, digests: Digests, data_max: usize) -> std::io::Result<Read> {
        let mut head = [0u8; HEADER_BYTES_MAX];
        self.rd.read_exact(&mut head[..pdu::BHS_BYTES]).await?;
        let hl = pdu::header_len(&head, digests);
        self.rd.read_exact(&mut head[pdu::BHS_BYTES..hl]).await?;
        if let Err(e) = pdu::check_header(&head[..hl], digests, data_max) {
            return Ok(Read::Error(e.to_string()));
        }
        let mut p = Pdu::new(0);
        p.bhs.copy_from_slice(&head[..pdu::BHS_BYTES]);
        let ahs_end = pdu::BHS_BYTES + p.total_ahs_bytes();
        p.ahs = head[pdu::BHS_BYTES..ahs_end].to_vec();
        let dl = p.data_segment_len();
        if dl > 0 {
            p.data = frameio::read_payload(&mut self.rd, dl, PAYLOAD_SPARE_BYTES).await?;
        }
        let pad = pdu::pad4(dl);
        let mut tail = [0u8; 3 + pdu::DIGEST_BYTES];
        let tl = pdu::trailer_len(dl, digests);
        self.rd.read_exact(&mut tail[..tl]).await?;
        if dl > 0 && digests.data {
            let got = u32::from_le_bytes(tail[pad..pad + 4].try_into().expect("4 bytes"));
            if pdu::data_digest_padded(&p.data, &tail[..pad]) != got {
                p.ahs.clear();
                p.data.clear();
                return Ok(Read::BadData(p));
            }
        }
        Ok(Read::Pdu(p))
    }
}

/// The PDUs of one batch, ready for one gathered write.
#[derive(Default)]
pub struct Outbox {
    /// Encoded headers, trailers and whole small PDUs.
    head: Vec<u8>,
    items: Vec<Item>,
    /// Data-In payloads, sent from where they lie.
    payloads: Vec<Vec<u8>>,
    /// Gather's staging buffer, kept across batches.
    scratch: Vec<u8>,
    /// Start of the encoded bytes not yet in `items`.
    open: usize,
}

enum Item {
    Head(Range<usize>),
    Payload(usize, Range<usize>),
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.head.is_empty()
    }

    /// Close the run of encoded bytes since the last item.
    fn close_head(&mut self) {
        if self.head.len() > self.open {
            self.items.push(Item::Head(self.open..self.head.len()));
            self.open = self.head.len();
        }
    }

    /// A whole PDU, encoded (its data, small for every PDU but Data-In, is
    /// copied).
    pub fn pdu(&mut self, p: &Pdu, digests: Digests) {
        p.encode(digests, &mut self.head);
    }

    /// Data-In PDUs: headers and trailers encoded, data segments borrowed
    /// from the task's data.
    pub fn data_in(&mut self, d: DataIn, digests: Digests) {
        let buf = self.payloads.len();
        for (p, r) in &d.pdus {
            p.encode_header(r.len(), digests, &mut self.head);
            if !r.is_empty() {
                self.close_head();
                self.items.push(Item::Payload(buf, r.clone()));
            }
            pdu::encode_trailer(&d.data[r.clone()], digests, &mut self.head);
        }
        self.payloads.push(d.data);
    }

    /// Write everything collected with one gathered write (several when
    /// the batch has more pieces than one `writev` takes), then start
    /// afresh.
    pub async fn flush<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close_head();
        let mut g = Gather::new(std::mem::take(&mut self.scratch));
        for i in &self.items {
            match i {
                Item::Head(r) => g.push(&self.head[r.clone()]),
                Item::Payload(b, r) => g.push(&self.payloads[*b][r.clone()]),
            }
        }
        let r = g.write_to(w).await;
        self.head.clear();
        self.open = 0;
        self.items.clear();
        self.payloads.clear();
        self.scratch = r?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::op;

    fn pdu_with(n: usize) -> Pdu {
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.set_flags(pdu::FLAG_FINAL | pdu::FLAG_WRITE);
        p.set_itt(n as u32);
        p.set_u32_at(20, n as u32);
        p.data = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        p
    }

    const ALL_DIGESTS: [Digests; 3] = [
        Digests {
            header: false,
            data: false,
        },
        Digests {
            header: true,
            data: true,
        },
        Digests {
            header: false,
            data: true,
        },
    ];

    // Proves the reader returns exactly the PDUs the pure codec encodes
    // (every pad length, digests, AHS, small and large segments that are
    // read around the buffer), leaves room for the payload CRC, and ends
    // with Closed at the end of the stream.
    #[tokio::test]
    async fn reader_reads_what_encode_wrote() {
        for d in ALL_DIGESTS {
            let mut stream = Vec::new();
            let mut sent = Vec::new();
            for n in [0usize, 1, 3, 4, 4096, 100_000, 262_144, 5] {
                let mut p = pdu_with(n);
                if n == 5 {
                    p.ahs = vec![0, 4, 1, 0, 9, 9, 9, 9];
                }
                p.encode(d, &mut stream);
                sent.push(p);
            }
            let mut r = Reader::new(&stream[..]);
            for want in &sent {
                let Read::Pdu(mut got) = r.next(d, 262_144).await else {
                    panic!("{d:?} {}", want.data.len())
                };
                if !got.data.is_empty() {
                    assert!(got.data.capacity() >= got.data.len() + PAYLOAD_SPARE_BYTES);
                }
                got.bhs[4..8].copy_from_slice(&want.bhs[4..8]);
                assert_eq!(&got, want);
            }
            assert!(matches!(r.next(d, 262_144).await, Read::Closed));
        }
    }

    // Proves each rejection branch of the reader: a bad header digest and
    // a too long segment end the stream with an error, a bad data digest
    // gives the header for a Reject and the next PDU still reads, a stream
    // cut inside a PDU is Closed.
    #[tokio::test]
    async fn reader_rejections() {
        let d = Digests {
            header: true,
            data: true,
        };
        let mut b = pdu_with(10).to_bytes(d);
        b[20] ^= 1;
        assert!(matches!(
            Reader::new(&b[..]).next(d, 1024).await,
            Read::Error(_)
        ));
        let b = pdu_with(2000).to_bytes(d);
        assert!(matches!(
            Reader::new(&b[..]).next(d, 1024).await,
            Read::Error(_)
        ));
        let mut b = pdu_with(10).to_bytes(d);
        let n = b.len();
        b[n - 5] ^= 1;
        pdu_with(7).encode(d, &mut b);
        let mut r = Reader::new(&b[..]);
        let Read::BadData(h) = r.next(d, 1024).await else {
            panic!()
        };
        assert_eq!(h.itt(), 10);
        let Read::Pdu(p) = r.next(d, 1024).await else {
            panic!()
        };
        assert_eq!(p.itt(), 7);
        let b = pdu_with(10).to_bytes(d);
        assert!(matches!(
            Reader::new(&b[..b.len() - 1]).next(d, 1024).await,
            Read::Closed
        ));
    }

    // Proves a batch of whole PDUs and Data-In PDUs written from where
    // their data lies is byte for byte the PDUs' own encodings, in order.
    #[tokio::test]
    async fn outbox_writes_encodings_in_order() {
        for d in ALL_DIGESTS {
            let mut o = Outbox::default();
            let mut want = Vec::new();
            for round in 0..2 {
                let small = pdu_with(3 + round);
                o.pdu(&small, d);
                small.encode(d, &mut want);
                let data: Vec<u8> = (0..70_001).map(|i| (i % 253) as u8).collect();
                let mut pdus = Vec::new();
                for (k, r) in [0..30_000, 30_000..30_001, 30_001..70_001]
                    .into_iter()
                    .enumerate()
                {
                    let mut h = Pdu::new(op::DATA_IN);
                    h.set_itt(k as u32);
                    pdus.push((h, r));
                }
                let di = DataIn { data, pdus };
                for p in di.to_pdus() {
                    p.encode(d, &mut want);
                }
                o.data_in(di, d);
                let mut got = Vec::new();
                o.flush(&mut got).await.unwrap();
                assert_eq!(got, want, "{d:?}");
                assert!(o.is_empty());
                want.clear();
            }
        }
    }
}
