//! Human units for durations and bit rates, as operators type them: `10s`, `500ms`, `2Mbit`, `1G`.
//!
//! Prefixes are decimal (SI), as in `tc` and every link-speed spec: `1kbit` = 1,000 bit/s. Byte
//! rates (`MBps`, `MB/s`) are refused rather than guessed, because `tc` reads `mbps` as megabytes.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty value: expected {expected}")]
    Empty { expected: &'static str },
    #[error("`{input}` is not a number followed by a unit: expected {expected}")]
    Malformed {
        input: String,
        expected: &'static str,
    },
    #[error("`{input}` has no unit: write e.g. `{input}s` or `{input}ms`")]
    MissingDurationUnit { input: String },
    #[error("`{input}`: unknown unit `{unit}`: expected {expected}")]
    UnknownUnit {
        input: String,
        unit: String,
        expected: &'static str,
    },
    #[error("`{input}` is a byte rate; tapgraph takes bit rates: write e.g. `8Mbit` for 1 MB/s")]
    ByteRate { input: String },
    #[error("`{input}` is too large")]
    Overflow { input: String },
}

const DURATION_UNITS: &str = "a duration such as 250us, 500ms, 10s, 5m, 1h or 7d";
const RATE_UNITS: &str = "a bit rate such as 500kbit, 2Mbit, 1G or 1000000 (bit/s)";

/// Splits `12.5Mbit` into (`12.5`, `Mbit`) after trimming white space.
fn split_number(input: &str) -> (&str, &str) {
    let s = input.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

fn parse_number(num: &str, input: &str, expected: &'static str) -> Result<f64, UnitError> {
    let value: f64 = num.parse().map_err(|_| UnitError::Malformed {
        input: input.to_string(),
        expected,
    })?;
    if !value.is_finite() {
        return Err(UnitError::Overflow {
            input: input.to_string(),
        });
    }
    Ok(value)
}

/// Parses a duration: a decimal number and one of `ns`, `us`/`µs`, `ms`, `s`, `m`/`min`, `h`.
/// A bare `0` is accepted; any other bare number is refused, since its unit would be a guess.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let (num, unit) = split_number(input);
    if input.trim().is_empty() {
        return Err(UnitError::Empty {
            expected: DURATION_UNITS,
        });
    }
    if num.is_empty() {
        return Err(UnitError::Malformed {
            input: input.to_string(),
            expected: DURATION_UNITS,
        });
    }
    let value = parse_number(num, input, DURATION_UNITS)?;
    let nanos_per_unit: f64 = match unit {
        "" if value == 0.0 => 0.0,
        "" => {
            return Err(UnitError::MissingDurationUnit {
                input: input.trim().to_string(),
            });
        }
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" | "sec" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        "d" => 86_400e9,
        other => {
            return Err(UnitError::UnknownUnit {
                input: input.to_string(),
                unit: other.to_string(),
                expected: DURATION_UNITS,
            });
        }
    };
    let nanos = value * nanos_per_unit;
    if nanos > u64::MAX as f64 {
        return Err(UnitError::Overflow {
            input: input.to_string(),
        });
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}

const SIZE_UNITS: &str =
    "bytes with an optional unit: B, kB, MB, GB (powers of 1000) or KiB, MiB, GiB";

/// Parses a size in bytes: a decimal number and an optional unit, `B`, `kB`/`MB`/`GB` (powers of
/// 1000) or `KiB`/`MiB`/`GiB` (powers of 1024), any case.
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    if input.trim().is_empty() {
        return Err(UnitError::Empty {
            expected: SIZE_UNITS,
        });
    }
    let (num, unit) = split_number(input);
    if num.is_empty() {
        return Err(UnitError::Malformed {
            input: input.to_string(),
            expected: SIZE_UNITS,
        });
    }
    let value = parse_number(num, input, SIZE_UNITS)?;
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(UnitError::UnknownUnit {
                input: input.to_string(),
                unit: unit.to_string(),
                expected: SIZE_UNITS,
            });
        }
    };
    let bytes = value * multiplier;
    if bytes >= u64::MAX as f64 {
        return Err(UnitError::Overflow {
            input: input.to_string(),
        });
    }
    Ok(bytes.round() as u64)
}

/// A size as [`parse_size`] reads it back: the largest binary unit that divides it exactly
/// (`4MiB`, `1536KiB`), else bytes (`1500B`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    UNITS
        .iter()
        .find(|(unit, _)| bytes > 0 && bytes.is_multiple_of(*unit))
        .map(|(unit, name)| format!("{}{name}", bytes / unit))
        .unwrap_or_else(|| format!("{bytes}B"))
}

/// Parses a bit rate in bit/s: a decimal number, an optional SI prefix (`k`, `M`, `G`, `T`, any case)
/// and an optional `bit`, `bit/s`, `bits` or `bps`.
pub fn parse_bitrate(input: &str) -> Result<u64, UnitError> {
    let (num, unit) = split_number(input);
    if input.trim().is_empty() {
        return Err(UnitError::Empty {
            expected: RATE_UNITS,
        });
    }
    if num.is_empty() {
        return Err(UnitError::Malformed {
            input: input.to_string(),
            expected: RATE_UNITS,
        });
    }
    let value = parse_number(num, input, RATE_UNITS)?;
    // Byte units are refused before case folding: `B` is bytes, `b` is bits.
    if unit.contains('B') || unit.to_ascii_lowercase().contains("byte") {
        return Err(UnitError::ByteRate {
            input: input.trim().to_string(),
        });
    }
    let lower = unit.to_ascii_lowercase();
    let (prefix, rest) = match lower.chars().next() {
        Some(c @ ('k' | 'm' | 'g' | 't')) => (Some(c), &lower[1..]),
        _ => (None, lower.as_str()),
    };
    if !matches!(rest, "" | "bit" | "bit/s" | "bits" | "bps" | "b/s" | "b") {
        return Err(UnitError::UnknownUnit {
            input: input.to_string(),
            unit: unit.to_string(),
            expected: RATE_UNITS,
        });
    }
    let multiplier = match prefix {
        None => 1.0,
        Some('k') => 1e3,
        Some('m') => 1e6,
        Some('g') => 1e9,
        Some(_) => 1e12,
    };
    let bits = value * multiplier;
    if bits > u64::MAX as f64 {
        return Err(UnitError::Overflow {
            input: input.to_string(),
        });
    }
    Ok(bits.round() as u64)
}

/// Formats a bit rate with the largest SI prefix that keeps it readable: `2Mbit`, `1.5Gbit`.
pub fn format_bitrate(bits_per_second: u64) -> String {
    const STEPS: [(f64, &str); 4] = [(1e12, "Tbit"), (1e9, "Gbit"), (1e6, "Mbit"), (1e3, "kbit")];
    let v = bits_per_second as f64;
    for (scale, name) in STEPS {
        if v >= scale {
            let scaled = v / scale;
            let text = format!("{scaled:.3}");
            let text = text.trim_end_matches('0').trim_end_matches('.');
            return format!("{text}{name}");
        }
    }
    format!("{bits_per_second}bit")
}

/// Formats a duration in the largest whole unit: `10s`, `500ms`, `250us`.
pub fn format_duration(d: Duration) -> String {
    let n = d.as_nanos();
    const STEPS: [(u128, &str); 5] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
    ];
    for (scale, name) in STEPS {
        if n >= scale && n.is_multiple_of(scale) {
            return format!("{}{name}", n / scale);
        }
    }
    if n >= 1_000_000 {
        return format!("{}ms", n as f64 / 1e6);
    }
    format!("{n}ns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 500ms "), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_name_the_input() {
        let e = parse_duration("10").unwrap_err();
        assert!(e.to_string().contains("`10` has no unit"), "{e}");
        let e = parse_duration("10 parsecs").unwrap_err();
        assert!(e.to_string().contains("unknown unit `parsecs`"), "{e}");
        assert!(matches!(
            parse_duration("ms"),
            Err(UnitError::Malformed { .. })
        ));
        assert!(matches!(parse_duration(""), Err(UnitError::Empty { .. })));
        assert!(matches!(
            parse_duration("1.2.3s"),
            Err(UnitError::Malformed { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999h"),
            Err(UnitError::Overflow { .. })
        ));
    }

    #[test]
    fn bitrates() {
        assert_eq!(parse_bitrate("2Mbit"), Ok(2_000_000));
        assert_eq!(parse_bitrate("500kbit"), Ok(500_000));
        assert_eq!(parse_bitrate("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bitrate("1.5Gbit/s"), Ok(1_500_000_000));
        assert_eq!(parse_bitrate("10mbit"), Ok(10_000_000));
        assert_eq!(parse_bitrate("1000000"), Ok(1_000_000));
        assert_eq!(parse_bitrate("64 kbps"), Ok(64_000));
    }

    #[test]
    fn bad_bitrates_are_refused() {
        assert!(matches!(
            parse_bitrate("1MB/s"),
            Err(UnitError::ByteRate { .. })
        ));
        assert!(matches!(
            parse_bitrate("2MBps"),
            Err(UnitError::ByteRate { .. })
        ));
        assert!(matches!(
            parse_bitrate("2 furlongs"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_bitrate("fast"),
            Err(UnitError::Malformed { .. })
        ));
        assert!(matches!(
            parse_bitrate("-1Mbit"),
            Err(UnitError::Malformed { .. })
        ));
    }

    #[test]
    fn formats_round_trip() {
        for s in ["2Mbit", "500kbit", "1Gbit", "1.5Gbit", "999bit"] {
            assert_eq!(format_bitrate(parse_bitrate(s).unwrap()), s);
        }
        for s in ["10s", "500ms", "250us", "5m", "1h"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
    }

    #[test]
    fn sizes_parse_in_both_bases_and_refuse_the_rest() {
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("1.5 KiB").unwrap(), 1536);
        assert_eq!(parse_size("42").unwrap(), 42);
        assert!(
            parse_size("10 parsecs")
                .unwrap_err()
                .to_string()
                .contains("parsecs")
        );
        assert!(parse_size("").is_err());
        assert!(parse_size("MB").is_err());
    }

    #[test]
    fn sizes_in_every_unit_and_case() {
        assert_eq!(parse_size("1B"), Ok(1));
        assert_eq!(parse_size("2kB"), Ok(2_000));
        assert_eq!(parse_size("2k"), Ok(2_000));
        assert_eq!(parse_size("3 MB"), Ok(3_000_000));
        assert_eq!(parse_size("3m"), Ok(3_000_000));
        assert_eq!(parse_size("4GB"), Ok(4_000_000_000));
        assert_eq!(parse_size("4g"), Ok(4_000_000_000));
        assert_eq!(parse_size("2KiB"), Ok(2_048));
        assert_eq!(parse_size("2MiB"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_size("2GiB"), Ok(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("1.5gib"), Ok(1_610_612_736));
        assert_eq!(parse_size("0.5kb"), Ok(500));
    }

    #[test]
    fn sizes_past_u64_are_refused() {
        let overflow = |input: &str| {
            Err(UnitError::Overflow {
                input: input.to_string(),
            })
        };
        // The largest float below 2^64 is the largest size taken.
        assert_eq!(
            parse_size("18446744073709549568"),
            Ok(18_446_744_073_709_549_568)
        );
        assert_eq!(parse_size("18446744074GB"), overflow("18446744074GB"));
        // u64::MAX itself rounds to 2^64 as a float: refused rather than clamped.
        assert_eq!(
            parse_size("18446744073709551615"),
            overflow("18446744073709551615")
        );
        let huge = "9".repeat(400);
        assert_eq!(parse_size(&huge), overflow(&huge));
    }

    #[test]
    fn every_rate_prefix_and_suffix() {
        assert_eq!(parse_bitrate("1T"), Ok(1_000_000_000_000));
        assert_eq!(parse_bitrate("2tbit"), Ok(2_000_000_000_000));
        assert_eq!(parse_bitrate("3k"), Ok(3_000));
        assert_eq!(parse_bitrate("3kb/s"), Ok(3_000));
        assert_eq!(parse_bitrate("3kb"), Ok(3_000));
        assert_eq!(parse_bitrate("3 kbits"), Ok(3_000));
        assert_eq!(parse_bitrate("4 gbit/s"), Ok(4_000_000_000));
        assert_eq!(parse_bitrate("5bit"), Ok(5));
        assert!(matches!(
            parse_bitrate("5 kilobytes"),
            Err(UnitError::ByteRate { .. })
        ));
        assert!(matches!(parse_bitrate(""), Err(UnitError::Empty { .. })));
        assert_eq!(format_bitrate(2_500_000_000_000), "2.5Tbit");
        assert_eq!(format_bitrate(1_000), "1kbit");
        assert_eq!(format_bitrate(0), "0bit");
    }

    #[test]
    fn bit_rates_past_u64_are_refused() {
        let overflow = |input: &str| {
            Err(UnitError::Overflow {
                input: input.to_string(),
            })
        };
        // u64::MAX as a float is 2^64: the largest rate taken, clamped to u64::MAX.
        assert_eq!(parse_bitrate("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_bitrate("18446745Tbit"), overflow("18446745Tbit"));
        assert_eq!(parse_bitrate("20000000T"), overflow("20000000T"));
        let huge = "9".repeat(400);
        assert_eq!(parse_bitrate(&huge), overflow(&huge));
    }

    #[test]
    fn durations_past_u64_nanoseconds_are_refused() {
        assert_eq!(
            parse_duration("18446744073709551615ns"),
            Ok(Duration::from_nanos(u64::MAX))
        );
        assert!(matches!(
            parse_duration("18446744074s"),
            Err(UnitError::Overflow { .. })
        ));
        assert!(matches!(
            parse_duration(&"9".repeat(400)),
            Err(UnitError::Overflow { .. })
        ));
        assert_eq!(parse_duration("2 min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3sec"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("7µs"), Ok(Duration::from_micros(7)));
    }

    #[test]
    fn fractional_durations_are_formatted_exactly() {
        let cases = [
            (Duration::from_nanos(1_500_001), "1.500001ms"),
            (Duration::from_nanos(2_000_000_500), "2000.0005ms"),
            (Duration::from_millis(1_500), "1500ms"),
            (Duration::from_micros(1_500_001), "1500001us"),
            (Duration::from_nanos(999_999), "999999ns"),
            (Duration::from_nanos(1_001), "1001ns"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(5_400), "90m"),
            (Duration::ZERO, "0ns"),
        ];
        for (duration, text) in cases {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration), "{text}");
        }
    }

    mod properties {
        //! Property tests: any text an operator or a peer can send never panics a parser, and what
        //! a formatter writes parses back. `PROPTEST_CASES=100000 cargo test -p tapgraph --lib
        //! units::` runs them longer.

        use super::*;
        use proptest::prelude::*;

        /// Text shaped like a value with a unit, so the parsers get past their first check.
        fn valueish() -> impl Strategy<Value = String> {
            "[ ]?[0-9]{0,24}[.]?[0-9]{0,6}[ ]?[a-zA-Zµ/]{0,6}[ ]?"
        }

        proptest! {
            #[test]
            fn no_text_panics_a_parser(text in any::<String>()) {
                let _ = parse_duration(&text);
                let _ = parse_size(&text);
                let _ = parse_bitrate(&text);
            }

            #[test]
            fn no_value_with_a_unit_panics_a_parser(text in valueish()) {
                let _ = parse_duration(&text);
                let _ = parse_size(&text);
                let _ = parse_bitrate(&text);
            }

            /// Whole units and fractional milliseconds, up to about 11 days in nanoseconds, where
            /// a float still holds every nanosecond.
            #[test]
            fn formatted_durations_parse_back(nanos in 0u64..1_000_000_000_000_000) {
                let d = Duration::from_nanos(nanos);
                prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
            }

            #[test]
            fn whole_seconds_format_and_parse_back(secs in 0u64..4_000_000_000) {
                let d = Duration::from_secs(secs);
                prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
            }

            /// `format_bitrate` keeps three decimals: what it writes parses back to within half of
            /// the last digit shown.
            #[test]
            fn formatted_bit_rates_parse_back_to_three_decimals(bits in any::<u64>()) {
                let text = format_bitrate(bits);
                let back = parse_bitrate(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let step = [1e12, 1e9, 1e6, 1e3]
                    .into_iter()
                    .find(|scale| bits as f64 >= *scale)
                    .map_or(0.0, |scale| scale / 1000.0);
                let error = (back as f64 - bits as f64).abs();
                prop_assert!(error <= step / 2.0 + bits as f64 * 1e-15, "{bits} -> {text} -> {back}");
            }

            #[test]
            fn formatted_sizes_parse_back(bytes in 0u64..(1 << 53)) {
                prop_assert_eq!(parse_size(&format_size(bytes)).unwrap(), bytes);
            }

            #[test]
            fn plain_numbers_are_bits_and_bytes(n in 0u64..(1 << 53)) {
                prop_assert_eq!(parse_bitrate(&n.to_string()), Ok(n));
                prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
            }

            #[test]
            fn sizes_scale_by_their_unit(
                n in 0u64..1_000_000,
                (unit, scale) in prop::sample::select(vec![
                    ("B", 1u64), ("kB", 1_000), ("MB", 1_000_000), ("GB", 1_000_000_000),
                    ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30),
                ]),
            ) {
                prop_assert_eq!(parse_size(&format!("{n}{unit}")), Ok(n * scale));
                prop_assert_eq!(parse_size(&format!("{n} {}", unit.to_uppercase())), Ok(n * scale));
            }
        }
    }
}
