//! Issue 22: delivery as analyzers expect it, in the lab of `mirror.rs`.
//!
//! ```text
//!   peer ──lan0── src (agent) ──eth0── hub (controller, TAP span9) ──span0── span (analyzer)
//! ```
//!
//! `tap:` frames are captured inbound (`tcpdump -Q in`) on the TAP device in `hub`, where a SPAN
//! port's frames arrive. This kernel has no GRE or ERSPAN devices, so `gre:` and `erspan:` packets
//! are captured on `span1` and decoded by tshark back into frames; each is compared, byte for byte
//! and in order, with what tcpdump recorded on lan0 at the source, and the key, session id,
//! sequence numbers and timestamps are read from tshark's dissection.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{require_root, wait_for};
use crate::mirror::{Dump, Frame, Lab, PORT, filter, hashes, read_pcap};

/// One GRE packet as tshark dissects it: the encapsulated frame and the header fields.
pub(crate) struct Decoded {
    inner: Vec<u8>,
    gre: Value,
    erspan: Value,
}

/// Every packet of `path`, dissected by tshark: the inner frame is what follows the offset at
/// which tshark found the second Ethernet header.
pub(crate) fn decode(path: &Path) -> Vec<Decoded> {
    let out = std::process::Command::new("tshark")
        .arg("-r")
        .arg(path)
        .args(["-T", "json", "-x", "--no-duplicate-keys"])
        .args(["-j", "frame eth gre erspan"])
        .output()
        .expect("tshark (scripts/install-deps installs it)");
    assert!(out.status.success(), "{out:?}");
    let packets: Vec<Value> = serde_json::from_slice(&out.stdout).expect("tshark's JSON");
    packets
        .iter()
        .map(|p| {
            let layers = &p["_source"]["layers"];
            let frame = hex(layers["frame_raw"][0].as_str().expect("frame_raw"));
            // [[outer hex, offset, length, ...], [inner hex, offset, ...]]
            let offset = layers["eth_raw"][1][1]
                .as_u64()
                .unwrap_or_else(|| panic!("no inner Ethernet header in {layers}"));
            Decoded {
                inner: frame[offset as usize..].to_vec(),
                gre: layers["gre"].clone(),
                erspan: layers["erspan"].clone(),
            }
        })
        .collect()
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

pub(crate) fn inner_hashes(decoded: &[Decoded]) -> Vec<String> {
    let frames: Vec<Frame> = decoded
        .iter()
        .map(|d| Frame {
            ts_ns: 0,
            data: d.inner.clone(),
        })
        .collect();
    hashes(&frames)
}

fn field(v: &Value, name: &str) -> String {
    v[name].as_str().unwrap_or_default().to_string()
}

/// Sets `target` (and its flags), sends `count` datagrams, and returns what tcpdump recorded at
/// the source and on `span1` (GRE only).
fn tunnel(lab: &Lab, label: &str, target: &[&str], count: usize) -> (Vec<Frame>, Vec<Decoded>) {
    let mut args = vec!["--target"];
    args.extend_from_slice(target);
    assert_eq!(lab.policy(&args), None);
    let f = filter(PORT);
    let at_src = Dump::start(lab, &lab.src, &format!("src-{label}"), "lan0", &f);
    let at_span = Dump::start(
        lab,
        &lab.span,
        &format!("span-{label}"),
        "span1",
        "ip proto 47",
    );
    let written = lab.written(target[0]);
    lab.send(PORT, count, 18..1400, Duration::from_micros(500));
    lab.wait_written(target[0], written + count as u64);
    let sent = at_src.finish_at(count);
    let path = at_span.path.clone();
    at_span.finish_at(count);
    (sent, decode(&path))
}

#[test]
fn tap_gre_and_erspan_targets_deliver_the_frames_byte_identical_in_order() {
    if !require_root("tap_gre_and_erspan_targets_deliver_the_frames_byte_identical_in_order") {
        return;
    }
    let lab = Lab::new();
    let f = filter(PORT);

    // tap: the controller creates span9 on the first batch; the frames after it arrive on its
    // receive path.
    let refused = lab.capture(&f, &["--limit", "100Mbit", "--target", "tap:span9"]);
    assert_eq!(refused, None);
    lab.send(PORT, 3, 100..200, Duration::from_millis(1));
    let stats = lab.wait_written("tap:span9", 3);
    assert_eq!(stats["target_note"], "created", "{stats}");
    let (ok, table) = lab.ctl(&["mirror"]);
    assert!(ok && table.contains("tap:span9 (created)"), "{table}");
    let at_src = Dump::start(&lab, &lab.src, "src-tap", "lan0", &f);
    let at_tap = Dump::start_with(&lab, &lab.hub, "hub-tap", "span9", &["-Q", "in"], &f);
    lab.send(PORT, 200, 18..1400, Duration::from_micros(500));
    lab.wait_written("tap:span9", 203);
    let (sent, seen) = (at_src.finish_at(200), at_tap.finish_at(200));
    assert_eq!(sent.len(), 200, "tcpdump at the source");
    assert_eq!(
        hashes(&seen),
        hashes(&sent),
        "inbound on the TAP device: the same frames, byte for byte, in order"
    );

    // A device the operator made is opened, not created, and stays.
    let made = lab
        .hub
        .command("ip")
        .args(["tuntap", "add", "dev", "span8", "mode", "tap"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    assert_eq!(lab.policy(&["--target", "tap:span8"]), None);
    lab.send(PORT, 3, 100..200, Duration::from_millis(1));
    let stats = lab.wait_written("tap:span8", 3);
    assert_eq!(stats["target_note"], "opened", "{stats}");

    // GRE with a key.
    let (sent, decoded) = tunnel(&lab, "gre", &["gre:10.99.0.2", "--gre-key", "4242"], 100);
    assert_eq!(inner_hashes(&decoded), hashes(&sent));
    for d in &decoded {
        assert_eq!(field(&d.gre, "gre.proto"), "0x6558", "{}", d.gre);
        assert_eq!(field(&d.gre, "gre.key"), "0x00001092", "{}", d.gre);
    }

    // ERSPAN type II (the default), session 677: numbered from where the target began.
    let (sent, decoded) = tunnel(
        &lab,
        "erspan2",
        &["erspan:10.99.0.2", "--erspan-session", "677"],
        100,
    );
    assert_eq!(inner_hashes(&decoded), hashes(&sent));
    let mut sequences = vec![];
    for d in &decoded {
        assert_eq!(field(&d.gre, "gre.proto"), "0x88be", "{}", d.gre);
        assert_eq!(field(&d.erspan, "erspan.version"), "1", "{}", d.erspan);
        assert_eq!(field(&d.erspan, "erspan.spanid"), "677", "{}", d.erspan);
        sequences.push(field(&d.gre, "gre.sequence_number").parse::<u64>().unwrap());
    }
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive sequence numbers: {sequences:?}"
    );

    // ERSPAN type III, session 5: the timestamp is the capture's, in 100 µs units.
    let (sent, decoded) = tunnel(
        &lab,
        "erspan3",
        &[
            "erspan:10.99.0.2",
            "--erspan-type",
            "3",
            "--erspan-session",
            "5",
        ],
        100,
    );
    assert_eq!(inner_hashes(&decoded), hashes(&sent));
    for (d, s) in decoded.iter().zip(&sent) {
        assert_eq!(field(&d.gre, "gre.proto"), "0x22eb", "{}", d.gre);
        assert_eq!(field(&d.erspan, "erspan.version"), "2", "{}", d.erspan);
        assert_eq!(field(&d.erspan, "erspan.spanid"), "5", "{}", d.erspan);
        assert_eq!(field(&d.erspan, "erspan.gra"), "0", "{}", d.erspan);
        let stamp: u32 = field(&d.erspan, "erspan.timestamp").parse().unwrap();
        // The agent and the source's tcpdump stamp each packet independently, within 1 ms.
        let at_source = (s.ts_ns / 100_000) as u32;
        assert!(
            stamp
                .wrapping_sub(at_source)
                .min(at_source.wrapping_sub(stamp))
                <= 10,
            "timestamp {stamp} vs {at_source} at the source"
        );
    }
    let m = wait_for("erspan counters", Duration::from_secs(5), || {
        lab.mirror("erspan:10.99.0.2")
            .filter(|m| m["packets_written"].as_u64() >= Some(200))
    });
    assert_eq!(m["dropped"]["failed"], 0, "{m}");

    // Several targets at once: reinjected on the TAP device and recorded, every frame to each,
    // each target with its own counters.
    let file = lab.world.path().join("both.pcapng");
    let recorded = format!("pcap:{}", file.display());
    assert_eq!(
        lab.policy(&["--target", "tap:span9", "--target", &recorded]),
        None
    );
    lab.send(PORT, 3, 100..200, Duration::from_millis(1));
    lab.wait_written(&recorded, 3);
    let tapped = lab.written("tap:span9");
    let at_src = Dump::start(&lab, &lab.src, "src-both", "lan0", &f);
    let at_tap = Dump::start_with(&lab, &lab.hub, "hub-both", "span9", &["-Q", "in"], &f);
    lab.send(PORT, 150, 18..1400, Duration::from_micros(500));
    lab.wait_written("tap:span9", tapped + 150);
    lab.wait_written(&recorded, 153);
    let (sent, seen) = (at_src.finish_at(150), at_tap.finish_at(150));
    assert_eq!(hashes(&seen), hashes(&sent), "tap: of two targets");
    // The file is complete once the policy lets go of it.
    assert_eq!(lab.policy(&["--target", "none"]), None);
    let whole = wait_for("pcapng complete", Duration::from_secs(10), || {
        let frames = read_pcap(&file);
        (frames.len() == 153).then_some(frames)
    });
    assert_eq!(hashes(&whole[3..]), hashes(&sent), "pcap: of two targets");
}
