//! Finding a controller that answers. `controller` may list several replicas, and a DNS name may
//! stand for several: every attempt resolves each entry afresh (replicas come and go), shuffles
//! the addresses and tries them in turn, each with the connect timeout. A fleet so spreads itself
//! over the replicas and moves when one dies; a dead replica costs one connect timeout, and only
//! when none answers does the caller back off.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::Rng;
use rand::seq::SliceRandom;
use tapgraph::tls::ClientConfig;
use tapgraph::transport::{self, ChannelOptions, ConnectError};
use tonic::transport::Channel;

use crate::config::{ControllerAddr, Controllers};

/// One address to try, with the name the controller's certificate must carry there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub server_name: String,
}

/// A connection to one controller, and every controller address known at the time.
#[derive(Debug)]
pub struct Connected {
    pub channel: Channel,
    pub chosen: Candidate,
    /// Every address of every entry that resolved (the chosen one first): the agent's rows
    /// towards any of them are control-plane traffic, also towards a replica it just left.
    pub controllers: Vec<SocketAddr>,
}

/// One place that did not answer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// An address, or an entry that did not resolve.
    pub target: String,
    pub error: String,
}

/// No controller answered. Says why for each address (or entry) tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DialError {
    /// Never empty: every entry resolves to at least one address or fails.
    pub failures: Vec<Failure>,
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.failures.as_slice() {
            // One address, as with a single controller: its error alone, as before lists.
            [one] => f.write_str(&one.error),
            all => write!(f, "no controller answered: {}", joined(all)),
        }
    }
}

/// `target: error; target: error`.
fn joined(failures: &[Failure]) -> String {
    let each: Vec<String> = failures
        .iter()
        .map(|f| format!("{}: {}", f.target, f.error))
        .collect();
    each.join("; ")
}

/// Connects to one of `controllers`: every address of every entry, in random order, until one
/// answers.
pub async fn dial(
    controllers: &Controllers,
    tls: Arc<ClientConfig>,
    options: &ChannelOptions,
) -> Result<Connected, DialError> {
    let (resolved, mut failures) = resolve(controllers).await;
    let candidates = candidates(&resolved, &mut rand::rng());
    let answer = first_answer(&candidates, |c| {
        let tls = tls.clone();
        async move { transport::connect_addr(c.addr, &c.server_name, tls, options).await }
    })
    .await;
    match answer {
        Ok((channel, chosen, skipped)) => {
            failures.extend(skipped);
            if !failures.is_empty() {
                let unreachable = joined(&failures);
                tracing::warn!(controller = %chosen.addr, %unreachable, "connected, but some controller addresses did not answer");
            }
            Ok(Connected {
                channel,
                controllers: addresses(&chosen, &candidates),
                chosen,
            })
        }
        Err(skipped) => {
            failures.extend(skipped);
            Err(DialError { failures })
        }
    }
}

/// `chosen`'s address, then every other candidate's, each once.
fn addresses(chosen: &Candidate, candidates: &[Candidate]) -> Vec<SocketAddr> {
    let mut addrs = vec![chosen.addr];
    for c in candidates {
        if !addrs.contains(&c.addr) {
            addrs.push(c.addr);
        }
    }
    addrs
}

/// Resolves every entry at once: each entry's addresses, in the order configured, and a failure
/// for each entry that did not resolve.
async fn resolve(
    controllers: &Controllers,
) -> (Vec<(&ControllerAddr, Vec<SocketAddr>)>, Vec<Failure>) {
    let mut lookups = tokio::task::JoinSet::new();
    for (i, entry) in controllers.entries().iter().enumerate() {
        let (host, port) = (entry.host.clone(), entry.port);
        lookups.spawn(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), port)).await;
            (i, addrs.map(Iterator::collect::<Vec<_>>))
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = lookups.join_next().await {
        // A lookup task cannot panic; if it did, its entry is only missing from this attempt.
        if let Ok(result) = joined {
            results.push(result);
        }
    }
    sort_out(controllers, results)
}

/// The lookups' `results` (by entry index, in any order) as each entry's addresses, in the order
/// configured, and a failure for each entry that has none.
fn sort_out(
    controllers: &Controllers,
    mut results: Vec<(usize, std::io::Result<Vec<SocketAddr>>)>,
) -> (Vec<(&ControllerAddr, Vec<SocketAddr>)>, Vec<Failure>) {
    results.sort_by_key(|(i, _)| *i);
    let mut resolved = Vec::new();
    let mut failures = Vec::new();
    for (i, result) in results {
        let Some(entry) = controllers.entries().get(i) else {
            continue;
        };
        match result {
            Ok(addrs) if !addrs.is_empty() => resolved.push((entry, addrs)),
            Ok(_) => failures.push(Failure {
                target: entry.to_string(),
                error: "the name has no address".into(),
            }),
            Err(e) => failures.push(Failure {
                target: entry.to_string(),
                error: format!("cannot resolve {entry}: {e}"),
            }),
        }
    }
    (resolved, failures)
}

/// Every address of every entry once, with its entry's server name, in random order. An address
/// reached through two entries with the same server name is tried once.
pub fn candidates(
    resolved: &[(&ControllerAddr, Vec<SocketAddr>)],
    rng: &mut impl Rng,
) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = Vec::new();
    for (entry, addrs) in resolved {
        for addr in addrs {
            let candidate = Candidate {
                addr: *addr,
                server_name: entry.server_name.clone(),
            };
            if !all.contains(&candidate) {
                all.push(candidate);
            }
        }
    }
    all.shuffle(rng);
    all
}

/// Tries `candidates` in order with `connect` until one answers: that one, with the failures of
/// those tried before it; or every failure.
async fn first_answer<T, F, Fut>(
    candidates: &[Candidate],
    mut connect: F,
) -> Result<(T, Candidate, Vec<Failure>), Vec<Failure>>
where
    F: FnMut(Candidate) -> Fut,
    Fut: Future<Output = Result<T, ConnectError>>,
{
    let mut failures = Vec::new();
    for candidate in candidates {
        match connect(candidate.clone()).await {
            Ok(channel) => return Ok((channel, candidate.clone(), failures)),
            Err(e) => {
                tracing::debug!(controller = %candidate.addr, error = %e, "controller address did not answer");
                failures.push(Failure {
                    target: candidate.addr.to_string(),
                    error: e.to_string(),
                });
            }
        }
    }
    Err(failures)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::config::parse_controllers;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn entry(host: &str, server_name: &str) -> ControllerAddr {
        ControllerAddr {
            host: host.into(),
            port: 7443,
            server_name: server_name.into(),
        }
    }

    #[test]
    fn every_address_of_every_entry_is_a_candidate_once_in_varying_order() {
        let a = entry("a.example", "a.example");
        let b = entry("b.example", "b.example");
        let c = entry("replicas.example", "replicas.example");
        let resolved = vec![
            (&a, vec![addr("10.0.0.1:7443")]),
            (&b, vec![addr("10.0.0.2:7443"), addr("10.0.0.2:7443")]),
            // A name with three addresses counts as three.
            (
                &c,
                vec![
                    addr("10.0.1.1:7443"),
                    addr("10.0.1.2:7443"),
                    addr("[fd00::3]:7443"),
                ],
            ),
        ];
        let expected: BTreeSet<(SocketAddr, &str)> = [
            ("10.0.0.1:7443", "a.example"),
            ("10.0.0.2:7443", "b.example"),
            ("10.0.1.1:7443", "replicas.example"),
            ("10.0.1.2:7443", "replicas.example"),
            ("[fd00::3]:7443", "replicas.example"),
        ]
        .into_iter()
        .map(|(a, n)| (addr(a), n))
        .collect();
        let mut orders = BTreeSet::new();
        let mut firsts = BTreeSet::new();
        for seed in 0..64 {
            let list = candidates(&resolved, &mut StdRng::seed_from_u64(seed));
            assert_eq!(list.len(), 5, "each address once: {list:?}");
            let got: BTreeSet<(SocketAddr, &str)> = list
                .iter()
                .map(|c| (c.addr, c.server_name.as_str()))
                .collect();
            assert_eq!(got, expected);
            firsts.insert(list[0].addr);
            orders.insert(list.iter().map(|c| c.addr).collect::<Vec<_>>());
        }
        assert!(orders.len() > 20, "the order varies: {orders:?}");
        assert_eq!(firsts.len(), 5, "every address comes first sometimes");
    }

    #[test]
    fn one_address_is_one_candidate() {
        let a = entry("127.0.0.1", "127.0.0.1");
        let resolved = vec![(&a, vec![addr("127.0.0.1:7443")])];
        let list = candidates(&resolved, &mut rand::rng());
        assert_eq!(
            list,
            vec![Candidate {
                addr: addr("127.0.0.1:7443"),
                server_name: "127.0.0.1".into()
            }]
        );
    }

    #[test]
    fn the_same_address_under_two_server_names_is_tried_under_each() {
        let a = entry("ctl.example", "ctl.example");
        let b = entry("10.0.0.1", "10.0.0.1");
        let resolved = vec![
            (&a, vec![addr("10.0.0.1:7443")]),
            (&b, vec![addr("10.0.0.1:7443")]),
        ];
        assert_eq!(candidates(&resolved, &mut rand::rng()).len(), 2);
    }

    fn list(addrs: &[&str]) -> Vec<Candidate> {
        addrs
            .iter()
            .map(|a| Candidate {
                addr: addr(a),
                server_name: "ctl".into(),
            })
            .collect()
    }

    #[tokio::test]
    async fn candidates_are_tried_in_turn_until_one_answers() {
        let all = list(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"]);
        let mut tried = Vec::new();
        let answer = first_answer(&all, |c| {
            tried.push(c.addr);
            let up = c.addr == addr("10.0.0.3:1");
            async move {
                if up {
                    Ok("channel")
                } else {
                    Err(ConnectError::Transport("connection refused".into()))
                }
            }
        })
        .await;
        let (channel, chosen, skipped) = answer.unwrap();
        assert_eq!(channel, "channel");
        assert_eq!(chosen.addr, addr("10.0.0.3:1"));
        assert_eq!(
            tried,
            vec![addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1")],
            "in order, and none after the one that answered"
        );
        assert_eq!(
            skipped,
            vec![
                Failure {
                    target: "10.0.0.1:1".into(),
                    error: "connection refused".into()
                },
                Failure {
                    target: "10.0.0.2:1".into(),
                    error: "connection refused".into()
                },
            ]
        );
    }

    #[tokio::test]
    async fn when_none_answers_every_failure_is_reported_once() {
        let all = list(&["10.0.0.1:1", "[fd00::1]:1"]);
        let mut tried = 0;
        let failures = first_answer(&all, |c| {
            tried += 1;
            let error = format!("refused by {}", c.addr);
            async move { Err::<(), _>(ConnectError::Transport(error)) }
        })
        .await
        .unwrap_err();
        assert_eq!(tried, 2);
        let error = DialError { failures };
        assert_eq!(
            error.to_string(),
            "no controller answered: 10.0.0.1:1: refused by 10.0.0.1:1; [fd00::1]:1: refused by [fd00::1]:1"
        );
    }

    #[test]
    fn the_control_plane_is_every_controller_address_the_chosen_one_first() {
        let mut all = list(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]);
        // The same address under another server name is one address.
        all.push(Candidate {
            addr: addr("10.0.0.1:1"),
            server_name: "other".into(),
        });
        assert_eq!(
            addresses(&all[1], &all),
            vec![addr("10.0.0.2:1"), addr("10.0.0.1:1"), addr("10.0.0.3:1")]
        );
    }

    #[test]
    fn a_single_failure_reads_as_before_lists() {
        let error = DialError {
            failures: vec![Failure {
                target: "127.0.0.1:7443".into(),
                error: "transport error: connection refused".into(),
            }],
        };
        assert_eq!(error.to_string(), "transport error: connection refused");
    }

    #[tokio::test]
    async fn entries_resolve_to_their_addresses_and_bad_names_fail_alone() {
        let controllers =
            parse_controllers("127.0.0.1:7443, [::1]:7444, nowhere.invalid:7443", None).unwrap();
        let (resolved, failures) = resolve(&controllers).await;
        let got: Vec<(String, Vec<SocketAddr>)> = resolved
            .iter()
            .map(|(e, a)| (e.server_name.clone(), a.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("127.0.0.1".to_string(), vec![addr("127.0.0.1:7443")]),
                ("::1".to_string(), vec![addr("[::1]:7444")]),
            ]
        );
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].target, "nowhere.invalid:7443");
        assert!(
            failures[0]
                .error
                .starts_with("cannot resolve nowhere.invalid:7443: "),
            "{failures:?}"
        );
    }

    #[test]
    fn lookups_are_sorted_out_in_the_order_configured_and_an_empty_one_fails() {
        let controllers = parse_controllers("a:1,b:2,c:3", None).unwrap();
        let results = vec![
            (2, Ok(vec![addr("10.0.0.3:3")])),
            (1, Ok(vec![])),
            (0, Ok(vec![addr("10.0.0.1:1"), addr("10.0.0.2:1")])),
        ];
        let (resolved, failures) = sort_out(&controllers, results);
        let got: Vec<(&str, Vec<SocketAddr>)> = resolved
            .iter()
            .map(|(e, a)| (e.host.as_str(), a.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", vec![addr("10.0.0.1:1"), addr("10.0.0.2:1")]),
                ("c", vec![addr("10.0.0.3:3")]),
            ]
        );
        assert_eq!(
            failures,
            vec![Failure {
                target: "b:2".into(),
                error: "the name has no address".into()
            }]
        );
    }

    #[tokio::test]
    async fn nothing_listening_anywhere_is_one_error_naming_each_address() {
        // Two ports taken at once (so they differ) and then freed: nothing listens on either.
        let listeners: Vec<_> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(listeners);
        let text = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
        let controllers = parse_controllers(&text, None).unwrap();
        let tls = tapgraph::tls::pinned_client_config(&"ab".repeat(32)).unwrap();
        let error = dial(&controllers, tls, &ChannelOptions::default())
            .await
            .unwrap_err();
        let mut targets: Vec<String> = error.failures.iter().map(|f| f.target.clone()).collect();
        targets.sort();
        let mut expected: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        expected.sort();
        assert_eq!(targets, expected, "{error}");
    }
}
