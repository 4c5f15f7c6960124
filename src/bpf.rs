//! BPF filter validation with libpcap itself, on a dead handle: no device, no privileges.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid BPF filter `{filter}`: {reason}")]
pub struct BpfError {
    pub filter: String,
    /// libpcap's own message, e.g. `syntax error` or `unknown port 'banana'`.
    pub reason: String,
}

/// Compiles `filter` for Ethernet frames as libpcap would for a live capture. An empty filter
/// matches everything and is valid. Host names in a filter are resolved by libpcap (DNS).
pub fn check_filter(filter: &str) -> Result<(), BpfError> {
    let fail = |reason: String| BpfError {
        filter: filter.to_string(),
        reason,
    };
    let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).map_err(|e| fail(e.to_string()))?;
    dead.compile(filter, true)
        .map(|_| ())
        .map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_filters_compile() {
        for f in ["", "tcp port 80", "udp and not port 53", "host 10.0.0.1"] {
            check_filter(f).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn bad_filters_carry_libpcap_text() {
        let e = check_filter("tcp port banana").unwrap_err();
        assert!(e.reason.contains("banana"), "{e}");
        let e = check_filter("tcp and and").unwrap_err();
        assert!(e.reason.contains("syntax error"), "{e}");
    }
}
