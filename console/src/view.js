// What the map shows of a folded graph under the operator's filters, and the clusters that remain.
// Pure: the map page draws what `visibleGraph` returns, and the test hook reports it.
import { cmp } from './fold.js';
import { bytes, processText, rtt } from './format.js';

/** Protocol as a lower-case name, whether the API sent a name or an IP protocol number. */
export function protocolName(p) {
  if (p === 6 || p === '6') return 'tcp';
  if (p === 17 || p === '17') return 'udp';
  return String(p ?? '').toLowerCase();
}

/** `k=v, k2=v2` (or a bare `k`: the label is present) as [[k, v|null]]; empty for blank text. */
export function parseLabelFilter(text) {
  return String(text || '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => {
      const i = s.indexOf('=');
      return i < 0 ? [s, null] : [s.slice(0, i).trim(), s.slice(i + 1).trim()];
    });
}

export function matchesLabels(node, terms) {
  return terms.every(([k, v]) => (v === null ? k in node.labels : node.labels[k] === v));
}

export const DEFAULT_OPTIONS = Object.freeze({
  showControlPlane: false,
  port: null,
  protocol: '',
  label: '',
  hidden: new Set(),
  hubDegree: null,
});

/**
 * The visible graph: {nodes: Map id → folded node, edges: Map id → {id, from, to, conns}} with only the
 * connections that pass the filters.
 * - A connection passes when it is not control-plane (unless shown) and matches the port and protocol.
 * - The label filter keeps the edges with a matching end: the matching nodes and what they talk to.
 * - With a port, protocol or label filter on, only nodes with a remaining edge (or matching the label)
 *   are shown. Without one every host is, and an external endpoint unless all of its connections were
 *   control-plane (the controller's address: the hub that hides every cluster).
 * - Then hidden nodes go, and after them every node with `hubDegree` or more distinct neighbours.
 */
export function visibleGraph(folded, options = {}) {
  const o = { ...DEFAULT_OPTIONS, ...options };
  const port = o.port === null || o.port === '' || Number.isNaN(Number(o.port)) ? null : Number(o.port);
  const protocol = protocolName(o.protocol);
  const terms = parseLabelFilter(o.label);
  const filtering = port !== null || protocol !== '' || terms.length > 0;

  const cpOnly = new Map(); // external id → true while all its connections seen are control-plane
  let edges = new Map();
  for (const e of folded.edges.values()) {
    for (const end of [e.from, e.to]) {
      const allCp = e.conns.every((c) => c.control_plane);
      cpOnly.set(end, (cpOnly.get(end) ?? true) && allCp);
    }
    const conns = e.conns.filter(
      (c) =>
        (o.showControlPlane || !c.control_plane) &&
        (port === null || Number(c.port) === port) &&
        (protocol === '' || protocolName(c.protocol) === protocol),
    );
    if (!conns.length) continue;
    if (terms.length) {
      const a = folded.nodes.get(e.from);
      const b = folded.nodes.get(e.to);
      if (!((a && matchesLabels(a, terms)) || (b && matchesLabels(b, terms)))) continue;
    }
    edges.set(e.id, { id: e.id, from: e.from, to: e.to, conns });
  }

  const keep = new Set();
  for (const n of folded.nodes.values()) {
    if (filtering) {
      if (terms.length && matchesLabels(n, terms)) keep.add(n.id);
    } else if (n.kind === 'host' || o.showControlPlane || !cpOnly.get(n.id)) {
      keep.add(n.id);
    }
  }
  for (const e of edges.values()) {
    keep.add(e.from);
    keep.add(e.to);
  }
  for (const id of o.hidden || []) keep.delete(id);
  edges = dropEdgesOutside(edges, keep);

  const hub = o.hubDegree === null || o.hubDegree === '' ? null : Number(o.hubDegree);
  if (hub !== null && !Number.isNaN(hub) && hub > 0) {
    const degree = neighbourCounts(keep, edges);
    for (const [id, d] of degree) if (d >= hub) keep.delete(id);
    edges = dropEdgesOutside(edges, keep);
  }

  const nodes = new Map();
  for (const id of [...keep].sort()) if (folded.nodes.has(id)) nodes.set(id, folded.nodes.get(id));
  return { nodes, edges: dropEdgesOutside(edges, new Set(nodes.keys())) };
}

function dropEdgesOutside(edges, keep) {
  const out = new Map();
  for (const [id, e] of edges) if (keep.has(e.from) && keep.has(e.to)) out.set(id, e);
  return out;
}

/** Distinct neighbours of each node, edges taken undirected. */
export function neighbourCounts(nodeIds, edges) {
  const adj = adjacency(nodeIds, edges);
  return new Map([...adj].map(([id, s]) => [id, s.size]));
}

function adjacency(nodeIds, edges) {
  const adj = new Map([...nodeIds].map((id) => [id, new Set()]));
  for (const e of edges.values()) {
    if (!adj.has(e.from) || !adj.has(e.to)) continue;
    adj.get(e.from).add(e.to);
    adj.get(e.to).add(e.from);
  }
  return adj;
}

/** Connected components (edges undirected), ids sorted, largest first, then lexicographically. */
export function clusters(view) {
  const adj = adjacency(view.nodes.keys(), view.edges);
  const seen = new Set();
  const out = [];
  for (const start of [...adj.keys()].sort()) {
    if (seen.has(start)) continue;
    seen.add(start);
    const group = [start];
    const stack = [start];
    while (stack.length) {
      for (const n of adj.get(stack.pop())) {
        if (!seen.has(n)) {
          seen.add(n);
          group.push(n);
          stack.push(n);
        }
      }
    }
    out.push(group.sort());
  }
  return out.sort((a, b) => b.length - a.length || compareLists(a, b));
}

function compareLists(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    const c = cmp(a[i], b[i]);
    if (c) return c;
  }
  return a.length - b.length;
}

export function counts(view) {
  let hosts = 0;
  let externals = 0;
  for (const n of view.nodes.values()) n.kind === 'host' ? hosts++ : externals++;
  return { hosts, externals, connections: view.edges.size, clusters: clusters(view).length };
}

/** "7 hosts · 2 external · 5 connections · 2 clusters" */
export function countsText(c) {
  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;
  const parts = [plural(c.hosts, 'host', 'hosts')];
  if (c.externals) parts.push(`${c.externals} external`);
  parts.push(plural(c.connections, 'connection', 'connections'), plural(c.clusters, 'cluster', 'clusters'));
  return parts.join(' · ');
}

/**
 * The folded node a search finds: by agent id, hostname, IP (a host's own addresses too) or DNS name;
 * exact matches first, then the first node (by id) containing the text. `agents` maps agent id → hostname.
 */
export function search(folded, text) {
  const q = String(text || '').trim().toLowerCase();
  if (!q) return null;
  const keysOf = (n) => [
    n.id.toLowerCase(),
    n.name.toLowerCase(),
    String(n.label).toLowerCase(),
    ...n.addresses.flatMap((a) => [a.ip.toLowerCase(), ...(a.dns ? [a.dns.toLowerCase()] : [])]),
  ];
  const all = [...folded.nodes.values()].sort((a, b) => cmp(a.id, b.id));
  return (
    all.find((n) => keysOf(n).some((k) => k === q)) ||
    all.find((n) => keysOf(n).some((k) => k.includes(q))) ||
    null
  );
}

/** A node's outbound and inbound dependencies: [{peer, port, protocol, process, sockets, active}]. */
export function dependencies(view, id) {
  const out = [];
  const inb = [];
  for (const e of view.edges.values()) {
    if (e.from === id) for (const c of e.conns) out.push({ peer: e.to, ...c });
    if (e.to === id) for (const c of e.conns) inb.push({ peer: e.from, ...c });
  }
  const order = (a, b) => cmp(a.peer, b.peer) || a.port - b.port;
  return { outbound: out.sort(order), inbound: inb.sort(order) };
}

/**
 * What an aggregated edge carried: bytes each way summed over its connections, the highest
 * smoothed RTT among them, retransmits summed; null when no connection was measured.
 */
export function edgeTraffic(conns) {
  let t = null;
  for (const c of conns) {
    if (!c.traffic) continue;
    t = t || { sent: 0, received: 0, srtt_us: 0, retransmits: 0 };
    t.sent += Number(c.traffic.bytes_sent) || 0;
    t.received += Number(c.traffic.bytes_received) || 0;
    t.srtt_us = Math.max(t.srtt_us, Number(c.traffic.srtt_us) || 0);
    t.retransmits += Number(c.traffic.retransmits) || 0;
  }
  return t;
}

/**
 * An edge's drawn width: by the bytes it carried when measured (1 px, one more per factor of 10
 * past 1 kB, at most 8), else by its sockets as before.
 */
export function edgeWidth(conns) {
  const t = edgeTraffic(conns);
  if (t) {
    const total = t.sent + t.received;
    return total < 1000 ? 1 : Math.min(8, 1 + Math.floor(Math.log10(total / 1000)) + 1);
  }
  const sockets = conns.reduce((s, c) => s + (c.sockets || 0), 0);
  return Math.min(6, 1.2 + Math.log2(1 + sockets) * 0.6);
}

/** One connection of an edge as the tooltip shows it, with its traffic when measured. */
export function connText(c) {
  const t = c.traffic;
  const traffic = t
    ? ` · ${bytes(t.bytes_sent)} sent / ${bytes(t.bytes_received)} received · rtt ${rtt(t.srtt_us)} (min ${rtt(t.min_rtt_us)})${t.retransmits ? ` · ${t.retransmits} retransmits` : ''}`
    : '';
  return `${c.port}/${protocolName(c.protocol)} ${processText(c)}${c.sockets > 1 ? ` ×${c.sockets}` : ''}${c.via ? ` via ${c.via}` : ''}${c.active ? '' : ' (inactive)'}${c.control_plane ? ' (control plane)' : ''}${traffic}`;
}
