//! Target `pcap:PATH`: pcapng files that keep the capture's nanosecond timestamps (`if_tsresol`
//! 9), its original lengths, and who captured each packet: one Interface Description Block per
//! distinct [`Origin`], named `AGENT_ID:IFACE` and described by the agent's hostname.
//!
//! Blocks are written with `pcap-file`, which writes an Enhanced Packet Block's timestamp as the
//! nanoseconds it is given: right for the `if_tsresol` 9 we declare (checked with tshark in the
//! tests).
//!
//! Nothing is ever overwritten. Without rotation, PATH is appended to as a new section when it
//! already holds a pcapng capture. With rotation (by size, by age, or both), the files are
//! `STEM-YYYYMMDDTHHMMSSZ-SEQ.EXT` beside PATH, created exclusively, each a complete capture with
//! its own section header and the interface blocks it needs; a file is closed before the packet
//! that would take it past the size, and at the first packet or flush past its age. After a failed
//! write the file is abandoned and a new one tried every 5 s; packets meanwhile fail with the
//! reason.

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::{DataLink, Endianness, PcapError};
use tapgraph::proto::Packet;

use super::frame::{LINKTYPE_RAW, RAW};
use super::{OpenError, Origin, Writer, Written};

/// Readers (Wireshark's `WTAP_MAX_PACKET_SIZE_STANDARD`) refuse a file with a longer packet.
const MAX_CAPTURED: usize = 262_144;
/// Option values are at most this long: their length field has 16 bits.
const MAX_OPTION: usize = 1024;
const RETRY: Duration = Duration::from_secs(5);
const BUFFER: usize = 256 * 1024;
/// Captures hold other people's traffic: owner and group only.
const MODE: u32 = 0o640;
/// Nanosecond timestamps.
const TSRESOL_NANOS: u8 = 9;

pub struct PcapngWriter {
    /// The configured path; rotated files are named after it.
    path: PathBuf,
    rotate_bytes: u64,
    rotate_interval: Duration,
    file: Option<Capture>,
    /// Numbers rotated files.
    seq: u64,
    /// After a failure: why, and when to try a new file.
    broken: Option<(String, Instant)>,
}

/// One open file.
struct Capture {
    out: PcapNgWriter<Counting<BufWriter<File>>>,
    path: PathBuf,
    packets: u64,
    opened: Instant,
    /// The origins described in this file; an origin's interface id is its index.
    origins: Vec<OriginKey>,
}

#[derive(Debug, PartialEq, Eq)]
struct OriginKey {
    agent_id: String,
    hostname: String,
    interface: String,
    linktype: u32,
    snaplen: u32,
}

impl PcapngWriter {
    /// Opens the file (the first one, with rotation) now, so that a bad path fails at open.
    pub fn open(
        path: &Path,
        rotate_bytes: u64,
        rotate_interval: Duration,
    ) -> Result<Self, OpenError> {
        let mut writer = Self {
            path: path.to_path_buf(),
            rotate_bytes,
            rotate_interval,
            file: None,
            seq: 1,
            broken: None,
        };
        writer.file = Some(writer.create()?);
        Ok(writer)
    }

    fn rotating(&self) -> bool {
        self.rotate_bytes > 0 || !self.rotate_interval.is_zero()
    }

    fn create(&mut self) -> Result<Capture, OpenError> {
        let failed = |path: &Path, source| OpenError::CreateFile {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
        }
        let (file, path) = if self.rotating() {
            loop {
                let path = rotated_name(&self.path, SystemTime::now(), self.seq);
                self.seq += 1;
                match OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(MODE)
                    .open(&path)
                {
                    Ok(file) => break (file, path),
                    // Another run's file of the same second: take the next number.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && self.seq < 1_000_000 => {}
                    Err(e) => return Err(failed(&path, e)),
                }
            }
        } else {
            let path = self.path.clone();
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .mode(MODE)
                .open(&path)
                .map_err(|e| failed(&path, e))?;
            match existing(&file).map_err(|e| failed(&path, e))? {
                Existing::Appendable => {}
                Existing::NotPcapng => return Err(OpenError::NotPcapng { path }),
                Existing::Damaged => return Err(OpenError::Damaged { path }),
            }
            (file, path)
        };
        let section = SectionHeaderBlock {
            endianness: Endianness::native(),
            options: vec![SectionHeaderOption::UserApplication(Cow::Owned(format!(
                "tapgraph-controller {}",
                tapgraph::VERSION
            )))],
            ..SectionHeaderBlock::default()
        };
        let out = Counting {
            inner: BufWriter::with_capacity(BUFFER, file),
            count: 0,
        };
        let out = PcapNgWriter::with_section_header(out, section)
            .map_err(|e| failed(&path, pcap_io(e)))?;
        Ok(Capture {
            out,
            path,
            packets: 0,
            opened: Instant::now(),
            origins: vec![],
        })
    }

    /// Whether the open file must be closed before a block of `next` more bytes.
    fn due(&self, file: &Capture, next: u64, now: Instant) -> bool {
        file.packets > 0
            && ((self.rotate_bytes > 0 && file.out.get_ref().count + next > self.rotate_bytes)
                || (!self.rotate_interval.is_zero()
                    && now.duration_since(file.opened) >= self.rotate_interval))
    }

    /// The open file, or a new one.
    fn current(&mut self, now: Instant) -> Result<&mut Capture, String> {
        let file = match self.file.take() {
            Some(file) => file,
            None => {
                if let Some((why, retry_at)) = &self.broken
                    && now < *retry_at
                {
                    return Err(why.clone());
                }
                let file = self.create().map_err(|e| {
                    let why = format!("{e}; retrying every {} s", RETRY.as_secs());
                    self.broken = Some((why.clone(), now + RETRY));
                    why
                })?;
                self.broken = None;
                file
            }
        };
        Ok(self.file.insert(file))
    }

    fn write_one(
        &mut self,
        origin: &Origin<'_>,
        packet: &Packet,
        now: Instant,
    ) -> Result<(), String> {
        let data = &packet.data[..];
        if data.len() > MAX_CAPTURED {
            return Err(format!(
                "packet of {} captured bytes is longer than pcapng readers accept ({MAX_CAPTURED}): \
                 lower the policy's snaplen",
                data.len()
            ));
        }
        if let Some(file) = &self.file {
            let next = epb_len(data.len())
                + file
                    .interface_of(origin)
                    .map_or_else(|| idb_len(origin), |_| 0);
            if self.due(file, next, now) {
                self.finish().map_err(|e| e.to_string())?;
            }
        }
        let file = self.current(now)?;
        let result = file.interface_id(origin).and_then(|interface_id| {
            file.out.write_pcapng_block(EnhancedPacketBlock {
                interface_id,
                timestamp: Duration::from_nanos(packet.timestamp_unix_nanos),
                original_len: packet.original_length.max(data.len() as u32),
                data: Cow::Borrowed(data),
                options: vec![],
            })
        });
        match result {
            Ok(_) => {
                file.packets += 1;
                Ok(())
            }
            Err(e) => {
                let why = format!(
                    "writing {}: {}; this file is abandoned, the next one tried in {} s",
                    file.path.display(),
                    pcap_io(e),
                    RETRY.as_secs()
                );
                // Dropping it flushes what it can; the file may end inside a block.
                self.file = None;
                self.broken = Some((why.clone(), now + RETRY));
                Err(why)
            }
        }
    }

    /// Flushes and closes the open file.
    fn finish(&mut self) -> io::Result<()> {
        match self.file.take() {
            Some(mut file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl Writer for PcapngWriter {
    fn write(&mut self, origin: &Origin<'_>, packets: &[Packet]) -> Written {
        let now = Instant::now();
        let mut written = Written::default();
        for packet in packets {
            match self.write_one(origin, packet, now) {
                Ok(()) => written.sent(packet.data.len()),
                Err(why) => written.fail(why),
            }
        }
        written
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(file) = &self.file
            && !self.rotate_interval.is_zero()
            && self.due(file, 0, Instant::now())
        {
            return self.finish();
        }
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl Capture {
    fn flush(&mut self) -> io::Result<()> {
        let path = &self.path;
        (self.out.get_mut().flush())
            .map_err(|e| io::Error::new(e.kind(), format!("flushing {}: {e}", path.display())))
    }

    fn interface_of(&self, origin: &Origin<'_>) -> Option<u32> {
        // Few origins per file, and one look-up per packet: a scan beats hashing owned keys.
        let at = self.origins.iter().position(|o| {
            (
                o.agent_id.as_str(),
                o.hostname.as_str(),
                o.interface.as_str(),
                o.linktype,
                o.snaplen,
            ) == (
                origin.agent_id,
                origin.hostname,
                origin.interface,
                origin.linktype,
                origin.snaplen,
            )
        })?;
        u32::try_from(at).ok()
    }

    /// The interface id of `origin` in this file, describing it first if it is new.
    fn interface_id(&mut self, origin: &Origin<'_>) -> Result<u32, PcapError> {
        if let Some(id) = self.interface_of(origin) {
            return Ok(id);
        }
        let id = u32::try_from(self.origins.len())
            .map_err(|_| PcapError::InvalidField("more than 2^32 interfaces"))?;
        self.out.write_pcapng_block(idb(origin))?;
        self.origins.push(OriginKey {
            agent_id: origin.agent_id.to_string(),
            hostname: origin.hostname.to_string(),
            interface: origin.interface.to_string(),
            linktype: origin.linktype,
            snaplen: origin.snaplen,
        });
        Ok(id)
    }
}

fn idb(origin: &Origin<'_>) -> InterfaceDescriptionBlock<'static> {
    let (name, description) = idb_strings(origin);
    InterfaceDescriptionBlock {
        linktype: DataLink::from(file_linktype(origin.linktype)),
        snaplen: origin.snaplen,
        options: vec![
            InterfaceDescriptionOption::IfName(Cow::Owned(name)),
            InterfaceDescriptionOption::IfDescription(Cow::Owned(description)),
            InterfaceDescriptionOption::IfTsResol(TSRESOL_NANOS),
        ],
    }
}

fn idb_strings(origin: &Origin<'_>) -> (String, String) {
    let name = format!("{}:{}", origin.agent_id, origin.interface);
    (clip(&name).to_string(), clip(origin.hostname).to_string())
}

/// Bytes of the interface block of `origin`: header and trailer, three options, end of options.
fn idb_len(origin: &Origin<'_>) -> u64 {
    let (name, description) = idb_strings(origin);
    let option = |len: usize| 4 + len.next_multiple_of(4) as u64;
    20 + option(name.len()) + option(description.len()) + option(1) + 4
}

/// Bytes of an Enhanced Packet Block of `captured` bytes, without options.
fn epb_len(captured: usize) -> u64 {
    32 + captured.next_multiple_of(4) as u64
}

/// libpcap's DLT as the LINKTYPE files carry (`pcap_datalink` → `dlt_to_linktype`, on Linux).
fn file_linktype(dlt: u32) -> u32 {
    match dlt {
        RAW => LINKTYPE_RAW,
        other => other,
    }
}

/// `s` cut to at most [`MAX_OPTION`] bytes, on a character boundary.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(MAX_OPTION);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `STEM-YYYYMMDDTHHMMSSZ-SEQ.EXT` beside `path` (EXT `pcapng` when it has none).
fn rotated_name(path: &Path, at: SystemTime, seq: u64) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or(Cow::Borrowed("capture"), |s| s.to_string_lossy());
    let ext = path
        .extension()
        .map_or(Cow::Borrowed("pcapng"), |s| s.to_string_lossy());
    let t = time::OffsetDateTime::from(at);
    path.with_file_name(format!(
        "{stem}-{:04}{:02}{:02}T{:02}{:02}{:02}Z-{seq:04}.{ext}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

enum Existing {
    /// Empty, or a pcapng capture ending on a block boundary.
    Appendable,
    NotPcapng,
    /// A pcapng capture cut inside a block: appending would hide what follows from readers.
    Damaged,
}

/// What an existing file holds, read from its first block and its last block's trailer.
fn existing(file: &File) -> io::Result<Existing> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Existing::Appendable);
    }
    let mut head = [0u8; 12];
    if len < 12 {
        return Ok(Existing::NotPcapng);
    }
    file.read_exact_at(&mut head, 0)?;
    let word: fn([u8; 4]) -> u32 = match head {
        [0x0a, 0x0d, 0x0d, 0x0a, _, _, _, _, 0x4d, 0x3c, 0x2b, 0x1a] => u32::from_le_bytes,
        [0x0a, 0x0d, 0x0d, 0x0a, _, _, _, _, 0x1a, 0x2b, 0x3c, 0x4d] => u32::from_be_bytes,
        _ => return Ok(Existing::NotPcapng),
    };
    let mut buf = [0u8; 4];
    let mut at = |offset| {
        file.read_exact_at(&mut buf, offset)
            .map(|()| u64::from(word(buf)))
    };
    let last = at(len - 4)?;
    if len % 4 != 0 || last < 12 || last % 4 != 0 || last > len || at(len - last + 4)? != last {
        return Ok(Existing::Damaged);
    }
    Ok(Existing::Appendable)
}

/// The I/O error inside a `pcap-file` error (whose own text says "reading" for writes too).
fn pcap_io(e: PcapError) -> io::Error {
    match e {
        PcapError::IoError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Counts the bytes written through it: the size of the file so far.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::tests::packet;
    use super::*;

    const A: Origin<'static> = Origin {
        agent_id: "agent-a",
        hostname: "web-1",
        interface: "eth0",
        linktype: 1,
        snaplen: 0,
    };
    const B: Origin<'static> = Origin {
        agent_id: "agent-b",
        hostname: "db-1",
        interface: "any",
        linktype: 113,
        snaplen: 262144,
    };

    /// `tshark -r FILE` fields, one row per packet; fails loudly without tshark.
    fn tshark(file: &Path, fields: &[&str]) -> Vec<Vec<String>> {
        let mut command = Command::new("tshark");
        command.arg("-r").arg(file).args(["-T", "fields"]);
        for f in fields {
            command.args(["-e", f]);
        }
        let out = command.output().unwrap_or_else(|e| {
            panic!("running tshark (install it with scripts/install-deps): {e}")
        });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "tshark -r {}: {stderr}",
            file.display()
        );
        let problems: Vec<_> = stderr
            .lines()
            .filter(|l| !l.contains("Running as user"))
            .collect();
        assert!(
            problems.is_empty(),
            "tshark -r {}: {problems:?}",
            file.display()
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    }

    fn ether(len: usize) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00, 0x45];
        f.resize(len, 0);
        f
    }

    fn cooked(len: usize) -> Vec<u8> {
        let mut f = vec![
            0, 4, 0, 1, 0, 6, 0x02, 0, 0, 0, 0, 1, 0, 0, 0x08, 0x00, 0x45,
        ];
        f.resize(len, 0);
        f
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn tshark_reads_nanoseconds_origins_and_original_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let target = tapgraph::policy::Target::Pcap {
            path: "mirror/out.pcapng".into(),
            rotate_bytes: 0,
            rotate_interval: Duration::ZERO,
        };
        let mut writer = super::super::open(&target, dir.path()).unwrap();
        let got = writer.write(
            &A,
            &[
                packet(1_700_000_000_123_456_789, 1514, ether(96)),
                packet(1_700_000_000_999_999_999, 60, ether(60)),
            ],
        );
        assert_eq!(
            got,
            Written {
                packets: 2,
                bytes: 156,
                ..Written::default()
            }
        );
        let got = writer.write(&B, &[packet(1_700_000_001_000_000_001, 9000, cooked(128))]);
        assert_eq!(
            got,
            Written {
                packets: 1,
                bytes: 128,
                ..Written::default()
            }
        );
        writer.write(&A, &[packet(1_700_000_002_000_000_000, 70, ether(70))]);
        writer.flush().unwrap();

        let file = dir.path().join("mirror/out.pcapng");
        let rows = tshark(
            &file,
            &[
                "frame.time_epoch",
                "frame.interface_name",
                "frame.interface_description",
                "frame.len",
                "frame.cap_len",
                "eth.type",
            ],
        );
        let want = [
            [
                "1700000000.123456789",
                "agent-a:eth0",
                "web-1",
                "1514",
                "96",
                "0x0800",
            ],
            [
                "1700000000.999999999",
                "agent-a:eth0",
                "web-1",
                "60",
                "60",
                "0x0800",
            ],
            [
                "1700000001.000000001",
                "agent-b:any",
                "db-1",
                "9000",
                "128",
                "",
            ],
            [
                "1700000002.000000000",
                "agent-a:eth0",
                "web-1",
                "70",
                "70",
                "0x0800",
            ],
        ];
        assert_eq!(rows, want.map(|r| r.map(str::to_string).to_vec()));
        assert_eq!(tshark(&file, &["sll.etype"])[2], ["0x0800"]);
    }

    #[test]
    fn rotation_by_size_makes_files_that_each_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer =
            PcapngWriter::open(&dir.path().join("cap.pcapng"), 4096, Duration::ZERO).unwrap();
        let packets: Vec<_> = (0..40)
            .map(|i| packet(1_700_000_000_000_000_000 + i, 200, ether(200)))
            .collect();
        for batch in packets.chunks(7) {
            let origin = if batch[0].timestamp_unix_nanos % 2 == 0 {
                A
            } else {
                B
            };
            assert_eq!(writer.write(&origin, batch).packets, batch.len() as u64);
        }
        writer.flush().unwrap();

        let files = files_in(dir.path());
        assert!(files.len() >= 3, "{files:?}");
        let mut seen = vec![];
        for (i, file) in files.iter().enumerate() {
            let name = file.file_name().unwrap().to_str().unwrap();
            // cap-YYYYMMDDTHHMMSSZ-SEQ.pcapng
            let (stem, rest) = name.split_at(4);
            assert_eq!(stem, "cap-");
            assert_eq!(&rest[8..9], "T");
            assert_eq!(&rest[15..], format!("Z-{:04}.pcapng", i + 1), "{name}");
            assert!(fs::metadata(file).unwrap().len() <= 4096, "{name}");
            for row in tshark(file, &["frame.time_epoch", "frame.interface_name"]) {
                seen.push(row[0].clone());
                assert!(
                    row[1] == "agent-a:eth0" || row[1] == "agent-b:any",
                    "{row:?}"
                );
            }
        }
        let want: Vec<_> = (0..40).map(|i| format!("1700000000.{i:09}")).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn rotation_by_age_closes_the_file_at_flush() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer =
            PcapngWriter::open(&dir.path().join("cap"), 0, Duration::from_millis(50)).unwrap();
        writer.write(&A, &[packet(1, 60, ether(60))]);
        std::thread::sleep(Duration::from_millis(60));
        writer.flush().unwrap();
        assert!(writer.file.is_none());
        writer.write(&A, &[packet(2, 60, ether(60))]);
        writer.flush().unwrap();
        let files = files_in(dir.path());
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files[0].to_str().unwrap().ends_with("-0001.pcapng"));
        for file in &files {
            assert_eq!(tshark(file, &["frame.len"]), [["60"]]);
        }
    }

    #[test]
    fn an_existing_capture_is_appended_to_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keep.pcapng");
        for round in 0..2u64 {
            let mut writer = PcapngWriter::open(&path, 0, Duration::ZERO).unwrap();
            writer.write(&A, &[packet(round, 60 + round as u32, ether(60))]);
            writer.flush().unwrap();
        }
        assert_eq!(tshark(&path, &["frame.len"]), [["60"], ["61"]]);

        fs::write(&path, b"not a capture at all").unwrap();
        let err = PcapngWriter::open(&path, 0, Duration::ZERO).err().unwrap();
        assert!(matches!(err, OpenError::NotPcapng { .. }), "{err}");

        let mut writer =
            PcapngWriter::open(&dir.path().join("cut.pcapng"), 0, Duration::ZERO).unwrap();
        writer.write(&A, &[packet(1, 60, ether(60))]);
        writer.flush().unwrap();
        let cut = dir.path().join("cut.pcapng");
        let len = fs::metadata(&cut).unwrap().len();
        File::options()
            .write(true)
            .open(&cut)
            .unwrap()
            .set_len(len - 8)
            .unwrap();
        let err = PcapngWriter::open(&cut, 0, Duration::ZERO).err().unwrap();
        assert!(err.to_string().ends_with("ends inside a block (a write was cut short): move it away (pcapfix can repair it) or turn rotation on"), "{err}");
    }

    #[test]
    fn unwritable_paths_fail_at_open_and_oversized_packets_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("file"), b"").unwrap();
        let err = PcapngWriter::open(&dir.path().join("file/sub/x.pcapng"), 0, Duration::ZERO)
            .err()
            .unwrap();
        assert!(
            err.to_string().starts_with("mirror target pcap: creating "),
            "{err}"
        );

        let mut writer =
            PcapngWriter::open(&dir.path().join("x.pcapng"), 0, Duration::ZERO).unwrap();
        let huge = packet(1, 300_000, vec![0; 300_000]);
        let got = writer.write(&A, &[huge, packet(2, 0, vec![]), packet(3, 60, ether(60))]);
        assert_eq!((got.packets, got.failed), (2, 1), "{got:?}");
        assert!(got.error.unwrap().contains("lower the policy's snaplen"));
        writer.flush().unwrap();
        assert_eq!(
            tshark(&dir.path().join("x.pcapng"), &["frame.len"]),
            [["0"], ["60"]]
        );
    }

    #[test]
    fn rotated_names_are_utc_and_numbered() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            rotated_name(Path::new("/x/cap.pcapng"), at, 7),
            Path::new("/x/cap-20231114T221320Z-0007.pcapng")
        );
        assert_eq!(
            rotated_name(Path::new("rel/cap"), at, 12345),
            Path::new("rel/cap-20231114T221320Z-12345.pcapng")
        );
    }
}
