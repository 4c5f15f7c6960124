// Development fixtures: a small fleet in the controller's JSON shapes, for `npm run dev` without a
// controller and for the unit tests. Never imported by the shipped console.
//
// Tiers: web-1..3 → app-1..2 → db-1; batch-1..2 → db-2; cache-1 beside the apps. Every host asks dns-1
// (the hub). Every agent talks to the controller at 10.0.0.100:7443 (control plane). app-1 calls an
// external payments API. batch-2 is lost, cache-1 degraded. From generation 13 on, batch-1 also calls
// 198.51.100.9:443 (a new external endpoint, for live updates).

const T0 = '2026-11-22T10:00:00Z';

const hosts = [
  ['web-1', 'web', '10.0.1.11'],
  ['web-2', 'web', '10.0.1.12'],
  ['web-3', 'web', '10.0.1.13'],
  ['app-1', 'app', '10.0.2.21'],
  ['app-2', 'app', '10.0.2.22'],
  ['cache-1', 'app', '10.0.2.31'],
  ['db-1', 'db', '10.0.3.41'],
  ['batch-1', 'batch', '10.0.4.51'],
  ['batch-2', 'batch', '10.0.4.52'],
  ['db-2', 'db', '10.0.3.42'],
  ['dns-1', 'infra', '10.0.0.53'],
];
const STATE = { 'batch-2': 'lost', 'cache-1': 'degraded' };

function conn(from, to, port, protocol, process, extra = {}) {
  return {
    from,
    to,
    kind: 'CONNECTS_TO',
    port,
    protocol,
    process,
    sockets: extra.sockets ?? 1,
    active: extra.active ?? true,
    control_plane: extra.control_plane ?? false,
    first_seen: T0,
    last_seen: T0,
  };
}

export function graph(generation = 12) {
  const nodes = [];
  const edges = [];
  for (const [h, role, ip] of hosts) {
    const properties = { hostname: h, agent_state: STATE[h] || 'connected', 'label.role': role, 'label.dc': 'fra1' };
    nodes.push({ id: `host:${h}`, kind: 'host', name: h, properties });
    nodes.push({ id: `addr:${ip}`, kind: 'address', name: ip, properties: {} });
    edges.push({ from: `host:${h}`, to: `addr:${ip}`, kind: 'HAS_ADDRESS' });
  }
  const svc = (h, proto, port, process) => {
    const id = `svc:${h}/${proto}/${port}`;
    nodes.push({ id, kind: 'service', name: `${h}:${port}/${proto}`, properties: { host: h, process, port: String(port), protocol: proto } });
    edges.push({ from: `host:${h}`, to: id, kind: 'LISTENS' });
    return id;
  };
  const dns = svc('dns-1', 'udp', 53, 'unbound');
  const app1 = svc('app-1', 'tcp', 8080, 'java');
  const app2 = svc('app-2', 'tcp', 8080, 'java');
  const db1 = svc('db-1', 'tcp', 5432, 'postgres');
  const db2 = svc('db-2', 'tcp', 5432, 'postgres');
  const cache = svc('cache-1', 'tcp', 6379, 'redis-server');
  for (const w of ['web-1', 'web-2', 'web-3']) {
    edges.push(conn(`host:${w}`, app1, 8080, 'tcp', 'nginx', { sockets: 4 }));
    edges.push(conn(`host:${w}`, app2, 8080, 'tcp', 'nginx', { sockets: 3 }));
  }
  for (const a of ['app-1', 'app-2']) {
    edges.push(conn(`host:${a}`, db1, 5432, 'tcp', 'java', { sockets: 10 }));
    edges.push(conn(`host:${a}`, cache, 6379, 'tcp', 'java', { sockets: 2 }));
  }
  edges.push(conn('host:batch-1', db2, 5432, 'tcp', 'python3', { sockets: 2 }));
  edges.push(conn('host:batch-2', db2, 5432, 'tcp', 'python3', { active: false }));
  for (const [h] of hosts) if (h !== 'dns-1') edges.push(conn(`host:${h}`, dns, 53, 'udp', 'systemd-resolve'));
  nodes.push({ id: 'addr:10.0.0.100', kind: 'address', name: '10.0.0.100', properties: { 'label.zone': 'mgmt' } });
  for (const [h] of hosts) edges.push(conn(`host:${h}`, 'addr:10.0.0.100', 7443, 'tcp', 'tapgraph-agent', { control_plane: true }));
  nodes.push({ id: 'addr:203.0.113.7', kind: 'address', name: '203.0.113.7', properties: { dns: 'api.payments.example', 'label.owner': 'saas' } });
  edges.push(conn('host:app-1', 'addr:203.0.113.7', 443, 'tcp', 'java', { sockets: 2 }));
  if (generation >= 13) {
    nodes.push({ id: 'addr:198.51.100.9', kind: 'address', name: '198.51.100.9', properties: {} });
    edges.push(conn('host:batch-1', 'addr:198.51.100.9', 443, 'tcp', 'curl'));
  }
  return { generation, nodes, edges };
}

export function agents(now = Date.now()) {
  return hosts.map(([h, role], i) => {
    const state = STATE[h] || 'connected';
    return {
      id: h,
      hostname: h,
      state,
      state_reason: state === 'lost' ? 'no control record for 3 heartbeat intervals' : state === 'degraded' ? 'dropped 120 packets (queue) since the last record' : null,
      remote_addr: `10.0.${i}.1:5${i}000`,
      controller: state === 'lost' ? '' : `ctl-${'abc'[i % 3]}`,
      agent_version: '0.1.0',
      kernel: '6.1.0',
      interfaces: ['eth0'],
      connected_at_unix_ms: now - 3_600_000,
      last_seen_unix_ms: state === 'lost' ? now - 95_000 : now - 2_000,
      sessions: 1,
      last_disconnect_reason: null,
      labels: { role, dc: 'fra1' },
      policy_name: role === 'web' ? 'web-capture' : 'default',
      policy_version_sent: 3,
      policy_version_applied: h === 'web-3' ? 2 : 3,
      policy_error: h === 'web-3' ? 'bpf: syntax error near "prot"' : null,
      control_records: 720,
      last_control_sequence: 720,
      capture: {
        state: role === 'web' ? 'running' : h === 'cache-1' ? 'stopped_breach' : 'disabled',
        error: null,
        packets_captured: role === 'web' ? 120_000 : 0,
        bytes_captured: 0,
        packets_sent: role === 'web' ? 119_500 : 0,
        bytes_sent: 0,
        packets_dropped_kernel: 0,
        packets_dropped_limiter: role === 'web' ? 400 : 0,
        packets_dropped_queue: h === 'cache-1' ? 120 : 0,
        packets_in_flight: role === 'web' ? 100 : 0,
        breach: null,
      },
      heartbeat_ms: 5000,
      clock_offset_ms: state === 'lost' ? null : (i - 5) * 0.37,
      probe_rtt_ms: 0.4,
      capture_pps: role === 'web' ? 850.5 : 0,
      send_pps: role === 'web' ? 847.1 : 0,
      send_bps: role === 'web' ? 6_100_000 : 0,
      snapshot_entries: 12 + i,
    };
  });
}

export function mirror() {
  return ['web-1', 'web-2', 'web-3'].map((h, i) => ({
    agent: h,
    target: 'pcapng:/var/lib/tapgraph/web.pcapng',
    batches: 1000,
    batches_lost: i === 2 ? 1 : 0,
    packets_received: 119_500,
    bytes_received: 80_000_000,
    packets_written: 119_500 - i * 10,
    bytes_written: 80_000_000,
    dropped: { queue_full: i * 10 },
    lost_in_transit: i === 2 ? 64 : 0,
    last_error: null,
    delay_p50_us: 900 + i * 100,
    delay_p99_us: 4_000 + i * 2_500,
  }));
}

export function policies() {
  return {
    policies: [
      { name: 'default', selector: 'all', version: 3, spec: { 'snapshot.interval': '15s', 'capture.enabled': 'false' }, updated_by: 'operator:alice', updated_at: T0 },
      { name: 'web-capture', selector: 'labels: role=web', version: 3, spec: { 'capture.filter': 'tcp port 443', 'capture.limit': '10Mbit/s', 'mirror.target': 'pcapng:/var/lib/tapgraph/web.pcapng' }, updated_by: 'operator:bob', updated_at: T0 },
    ],
    rollout: agents(0).map((a) => ({
      agent_id: a.id,
      policy: a.policy_name,
      version_wanted: a.policy_version_sent,
      version_applied: a.policy_version_applied,
      state: a.policy_error ? 'refused' : a.state === 'lost' ? 'pending' : 'applied',
      error: a.policy_error,
    })),
  };
}
