//! STUB (replaced by the wt-frames branch): HTTP/2 frame headers.

/// A GOAWAY frame the server sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Goaway {
    last_stream_id: u32,
    error_code: u32,
    debug_data: bytes::Bytes,
}

impl Goaway {
    /// The last stream id.
    pub fn last_stream_id(&self) -> u32 {
        self.last_stream_id
    }
    /// The error code.
    pub fn error_code(&self) -> u32 {
        self.error_code
    }
    /// Debug data.
    pub fn debug_data(&self) -> &[u8] {
        &self.debug_data
    }
    /// Graceful.
    pub fn is_graceful(&self) -> bool {
        self.error_code == 0
    }
}

pub(crate) struct FrameReader {
    header: [u8; 9],
    have: usize,
    skip: usize,
    goaway: Option<Vec<u8>>,
    need: usize,
    first: bool,
    off: bool,
}

impl FrameReader {
    pub(crate) fn client() -> Self {
        FrameReader {
            header: [0; 9],
            have: 0,
            skip: 0,
            goaway: None,
            need: 0,
            first: true,
            off: false,
        }
    }

    pub(crate) fn feed(&mut self, mut bytes: &[u8], mut on_goaway: impl FnMut(Goaway)) {
        while !bytes.is_empty() && !self.off {
            if let Some(buf) = &mut self.goaway {
                let take = self.need.min(bytes.len());
                buf.extend_from_slice(&bytes[..take]);
                self.need -= take;
                bytes = &bytes[take..];
                if self.need == 0 {
                    let buf = self.goaway.take().unwrap();
                    if buf.len() >= 8 {
                        on_goaway(Goaway {
                            last_stream_id: u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])
                                & 0x7fff_ffff,
                            error_code: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
                            debug_data: bytes::Bytes::copy_from_slice(&buf[8..]),
                        });
                    }
                }
                continue;
            }
            if self.skip > 0 {
                let take = self.skip.min(bytes.len());
                self.skip -= take;
                bytes = &bytes[take..];
                continue;
            }
            let take = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have == 9 {
                self.have = 0;
                let len = usize::from(self.header[0]) << 16
                    | usize::from(self.header[1]) << 8
                    | usize::from(self.header[2]);
                let kind = self.header[3];
                if self.first {
                    self.first = false;
                    if kind != 4 {
                        self.off = true;
                        return;
                    }
                }
                if kind == 7 {
                    self.goaway = Some(Vec::new());
                    self.need = len;
                    if len == 0 {
                        self.goaway = None;
                    }
                } else {
                    self.skip = len;
                }
            }
        }
    }

    pub(crate) fn is_off(&self) -> bool {
        self.off
    }
}
