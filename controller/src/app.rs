//! The controller's wiring: every long-running task, built and spawned in one place, in the order
//! each needs the others. `main` only starts an [`App`] and, on a signal, shuts it down.
//!
//! The named tasks (a name appears in the shutdown log when its task overruns the deadline):
//! - `registry`: the live agents and their sessions, health, time probes and policy rollout;
//! - `presence`: with a shared store, this replica's lease and its agents' presence, so that
//!   every replica answers for the whole fleet (`registry/presence.rs`);
//! - `mirror-stats`: with a shared store, the mirror streams landing on this replica, for the
//!   others to show;
//! - `enrollment`: tokens, enrolled agents, revocations and the CA key (`enrollment/`);
//! - `policies`: the stored policies and their version counter;
//! - `label-rules`, `console-tokens`: read the operators' label rules and console tokens again
//!   when another replica changes them;
//! - `topology`: the map and its redb tables (`topology/`);
//! - `neo4j-sink`: the writer to Neo4j, when `graph.neo4j.uri` is set;
//! - `grpc`: AgentService, EnrollmentService, AdminService, health and reflection on one mTLS port;
//! - `http`: /healthz, /readyz, /metrics, /api/v1 and the console.
//!
//! The mirror hub has no task of its own: each target's writer thread is opened by the first Mirror
//! stream that needs it and closed by the last (`mirror/hub.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tapgraph::proto::admin_service_server::AdminServiceServer;
use tapgraph::proto::agent_service_server::AgentServiceServer;
use tapgraph::proto::enrollment_service_server::EnrollmentServiceServer;
use tapgraph::runtime::Tasks;
use tapgraph::transport::TlsIo;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::ControllerConfig;
use crate::enrollment::Enrollment;
use crate::enrollment::ca::ControllerPki;
use crate::events::Events;
use crate::health::Health;
use crate::http::console;
use crate::mirror::Mirrors;
use crate::policies::Policies;
use crate::registry::{Registry, Sharing};
use crate::session::{AgentApi, StreamLimits};
use crate::topology::{Naming, Topology};
use crate::{admin, enrollment, http, session, sinks, store, topology};

/// The largest HTTP/2 frame agents may send: a mirror batch (at most 1 MiB) in one frame.
const MAX_FRAME_SIZE: u32 = 1 << 20;

/// The running controller. Guarantees that once [`App::start`] returns, both listeners are bound,
/// the stored state is loaded and every task is running; [`App::shutdown`] returns once every task
/// ended or was aborted at the deadline.
pub struct App {
    tasks: Tasks,
    /// Cancelled at shutdown: the servers, the sink and the event streams end on it.
    stop: CancellationToken,
    /// What /readyz reports.
    ready: Arc<AtomicBool>,
    grpc_health: tonic_health::server::HealthReporter,
    /// Held until the drain: a task that owns state ends once the last handle to it is dropped.
    registry: Registry,
    enrollment: Enrollment,
    policies: Policies,
    topology: Topology,
}

/// The handles to the tasks that own the controller's state. Everything else talks to them by
/// message.
struct Owners {
    events: Events,
    agent_health: Health,
    registry: Registry,
    enrollment: Enrollment,
    policies: Policies,
    topology: Topology,
}

impl App {
    /// Binds the listeners, loads the stored state from `store` (opened with the PKI, which may be
    /// kept in it), spawns every task and marks the controller ready, logging the addresses it
    /// serves on.
    pub async fn start(
        config: &ControllerConfig,
        pki: ControllerPki,
        store: store::Store,
    ) -> anyhow::Result<Self> {
        let tls = pki
            .server_config()
            .map_err(anyhow::Error::msg)
            .context("serving certificate")?;
        tracing::info!(store = %store.describe(), replica = %config.replica, "state store open");
        let grpc_listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", config.listen))?;
        let http_listener = TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        let mut tasks = Tasks::default();
        let stop = CancellationToken::new();
        let ready = Arc::new(AtomicBool::new(false));
        let fingerprint = pki.fingerprint();
        let addresses = vec![format!("grpc {grpc_addr}"), format!("http {http_addr}")];
        let owners = Owners::spawn(config, pki, &store, addresses, &mut tasks).await?;

        let operator_rules = topology::labels::OperatorRules::load(store.clone())?;
        tasks.spawn("label-rules", operator_rules.clone().follow(stop.clone()));
        let naming = Naming {
            config_rules: config.label_rules.clone(),
            operator_rules,
            names: if config.reverse_dns {
                topology::names::Names::new(Duration::from_secs(3600))
            } else {
                topology::names::Names::disabled()
            },
            agents: owners.agent_health.clone(),
        };
        let mut mirrors = Mirrors::new(config.state_dir.clone(), owners.agent_health.clone());
        if store.is_shared() {
            mirrors = mirrors.naming_files_after(&config.replica);
            tasks.spawn(
                "events-relay",
                crate::events::relay(
                    owners.events.clone(),
                    store.clone(),
                    config.replica.clone(),
                    stop.clone(),
                ),
            );
        }
        if let Some(writer) = owners.registry.mirror_writer(mirrors.clone(), stop.clone()) {
            tasks.spawn("mirror-stats", writer);
        }
        let sink = config.neo4j.clone().map(|settings| {
            let (sink, handle) = sinks::neo4j::Sink::new(
                settings,
                owners.topology.clone(),
                owners.enrollment.clone(),
                naming.clone(),
                owners.events.clone(),
                config.topology.ttl,
                store.leadership(sinks::neo4j::ROLE),
            );
            tasks.spawn("neo4j-sink", sink.run(stop.clone()));
            handle
        });
        let alert_stats = Arc::new(crate::alerts::AlertStats::default());
        if let Some(url) = config.alerts.url.clone() {
            tasks.spawn(
                "alerts",
                crate::alerts::run(
                    config.alerts.clone(),
                    url,
                    owners.events.clone(),
                    crate::alerts::Labels {
                        topology: owners.topology.clone(),
                        enrollment: owners.enrollment.clone(),
                        naming: naming.clone(),
                    },
                    alert_stats.clone(),
                    config.replica.clone(),
                ),
            );
        }
        let http_stats = Arc::new(http::HttpStats::default());
        let console_tokens = console::ConsoleTokens::load(store.clone())?;
        tasks.spawn(
            "console-tokens",
            console_tokens.clone().follow(stop.clone()),
        );
        let access = console::Access::new(
            console_tokens,
            config.console_token_always || !config.http_listen.ip().is_loopback(),
            &config.http,
            http_stats.clone(),
        );
        let console_url = console_url(config, http_addr);

        let (grpc_health, health_service) = tonic_health::server::health_reporter();
        set_grpc_health(&grpc_health, tonic_health::ServingStatus::Serving).await;
        let admin = admin::AdminApi {
            enrollment: owners.enrollment.clone(),
            registry: owners.registry.clone(),
            policies: owners.policies.clone(),
            topology: owners.topology.clone(),
            events: owners.events.clone(),
            naming: naming.clone(),
            mirrors: mirrors.clone(),
            console: access.clone(),
            console_url: console_url.clone(),
        };
        let grpc = grpc_server(
            config,
            &owners,
            mirrors.clone(),
            admin,
            health_service,
            tapgraph::transport::tls_incoming(grpc_listener, tls, config.handshake_timeout),
            stop.clone(),
        )?;
        tasks.spawn("grpc", grpc);

        let http_state = http::HttpState {
            registry: owners.registry.clone(),
            topology: owners.topology.clone(),
            enrollment: owners.enrollment.clone(),
            naming,
            policies: owners.policies.clone(),
            events: owners.events,
            ready: ready.clone(),
            store: store.clone(),
            sink,
            mirrors,
            access: access.clone(),
            http_stats,
            alert_stats,
            stop: stop.clone(),
            traffic_metrics: config.traffic_metrics,
        };
        let http_stop = stop.clone();
        let http_settings = config.http.clone();
        tasks.spawn("http", async move {
            http::serve(http_listener, http_state, &http_settings, http_stop).await;
        });

        ready.store(true, Ordering::Release);
        // The bound addresses, which differ from the configured ones when a port is 0.
        tracing::info!(
            grpc = %grpc_addr,
            http = %http_addr,
            state_dir = %config.state_dir.display(),
            ca_fingerprint = %fingerprint,
            console = %console_url,
            console_token = access.required,
            console_built = console::built(),
            version = tapgraph::VERSION,
            "controller ready"
        );
        Ok(Self {
            tasks,
            stop,
            ready,
            grpc_health,
            registry: owners.registry,
            enrollment: owners.enrollment,
            policies: owners.policies,
            topology: owners.topology,
        })
    }

    /// Reports not ready, ends the agents' sessions, stops the servers and waits up to `deadline`
    /// for every task; those still running then are aborted and named in a WARN.
    pub async fn shutdown(self, deadline: Duration) {
        self.ready.store(false, Ordering::Release);
        set_grpc_health(&self.grpc_health, tonic_health::ServingStatus::NotServing).await;
        // Sessions end first, so the gRPC server's graceful shutdown is not held up by open streams.
        self.registry.shutdown().await;
        self.stop.cancel();
        drop((self.registry, self.enrollment, self.policies, self.topology));
        self.tasks.drain(deadline).await;
    }
}

impl Owners {
    /// Spawns the registry, enrollment, policies and topology tasks, in that order: enrollment
    /// and policies talk to the registry, so it comes first. Policies are loaded before the listener serves, so the
    /// first agent already gets its stored policy.
    async fn spawn(
        config: &ControllerConfig,
        pki: ControllerPki,
        store: &store::Store,
        addresses: Vec<String>,
        tasks: &mut Tasks,
    ) -> anyhow::Result<Self> {
        let events = Events::new(1024);
        let agent_health = Health::default();
        // With a shared store, the registry records its agents' presence for the other replicas.
        let registry = if store.is_shared() {
            let sharing = Sharing::new(store.clone(), addresses);
            let (registry, registry_task, presence_task) = Registry::spawn_shared(
                &config.replica,
                events.clone(),
                agent_health.clone(),
                config.max_agents,
                sharing,
            );
            tasks.spawn("registry", registry_task);
            tasks.spawn("presence", presence_task);
            registry
        } else {
            let (registry, registry_task) = Registry::spawn(
                &config.replica,
                events.clone(),
                agent_health.clone(),
                config.max_agents,
            );
            tasks.spawn("registry", registry_task);
            registry
        };
        let (enrollment, enrollment_task) = Enrollment::spawn(
            store.clone(),
            pki.ca,
            config.agent_cert_lifetime,
            registry.clone(),
            events.clone(),
            enrollment::limits::EnrollLimits::new(config.enroll_rate, config.enroll_burst),
        )?;
        tasks.spawn("enrollment", enrollment_task);
        let (policies, policies_task) = Policies::spawn(
            store.clone(),
            &config.default_policy,
            registry.clone(),
            events.clone(),
        )
        .await?;
        tasks.spawn("policies", policies_task);
        let (topology, topology_task) =
            Topology::spawn(store.clone(), config.topology, events.clone())?;
        tasks.spawn("topology", topology_task);
        Ok(Self {
            events,
            agent_health,
            registry,
            enrollment,
            policies,
            topology,
        })
    }
}

/// The gRPC server on the agents' and operators' port, until `stop`: AgentService,
/// EnrollmentService, AdminService, health and reflection.
fn grpc_server<H: tonic_health::pb::health_server::Health>(
    config: &ControllerConfig,
    owners: &Owners,
    mirrors: Mirrors,
    admin: admin::AdminApi,
    health_service: tonic_health::pb::health_server::HealthServer<H>,
    incoming: ReceiverStream<Result<TlsIo, std::io::Error>>,
    stop: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()> + use<H>> {
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let agents = AgentServiceServer::new(AgentApi::new(
        owners.registry.clone(),
        owners.enrollment.clone(),
        owners.topology.clone(),
        mirrors,
        StreamLimits {
            hello_timeout: config.hello_timeout,
            idle_timeout: config.idle_timeout,
            max_mirror_streams: config.max_streams as usize,
        },
    ))
    .max_decoding_message_size(config.max_message_bytes);
    let enroll = EnrollmentServiceServer::new(enrollment::service::EnrollmentApi::new(
        owners.enrollment.clone(),
    ))
    .max_decoding_message_size(64 * 1024);
    let server = tonic::transport::Server::builder()
        // Mirror streams are bulk: HTTP/2's default 64 KiB window would stall each one
        // every 64 KiB for a WINDOW_UPDATE round trip. Credit, not memory.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        // ... and a batch goes as one DATA frame instead of a 16 KiB one per TLS record:
        // HTTP/2's per-frame work on both ends (flow control, stream wake-ups) then comes
        // once per batch.
        .max_frame_size(Some(MAX_FRAME_SIZE))
        .max_concurrent_streams(Some(config.max_streams + session::STREAM_HEADROOM))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(agents)
        .add_service(enroll)
        .add_service(AdminServiceServer::new(admin));
    Ok(async move {
        let served = server
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(error = %tapgraph::error_chain(&error), "gRPC server failed");
        }
    })
}

/// The services gRPC health reports: the server as a whole ("") and each of tapgraph's.
const GRPC_SERVICES: [&str; 4] = [
    "",
    tapgraph::proto::agent_service_server::SERVICE_NAME,
    tapgraph::proto::enrollment_service_server::SERVICE_NAME,
    tapgraph::proto::admin_service_server::SERVICE_NAME,
];

async fn set_grpc_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for service in GRPC_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// gRPC reflection in both versions, v1 and the v1alpha that many tools still speak (grpcio's
/// Python client among them), each listing tapgraph's services, grpc.health.v1.Health and both
/// reflection services: a generic client needs no local .proto file.
fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tapgraph::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection v1")?;
    let v1alpha = builder()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("gRPC reflection v1alpha")?;
    Ok((v1, v1alpha))
}

/// Where operators open the console: the HTTP listener's address, or the first server name when
/// it listens on every address.
fn console_url(config: &ControllerConfig, bound: SocketAddr) -> String {
    let host = if bound.ip().is_unspecified() {
        config
            .pki
            .server_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into())
    } else {
        bound.ip().to_string()
    };
    let scheme = if config.http.tls.is_some() {
        "https"
    } else {
        "http"
    };
    if host.contains(':') {
        format!("{scheme}://[{host}]:{}/", bound.port())
    } else {
        format!("{scheme}://{host}:{}/", bound.port())
    }
}
