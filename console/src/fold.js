// Folds the controller's raw graph (hosts, addresses, services and the edges between them) into the map
// operators draw: one node per host, with its own addresses and services folded into it, one node per
// address no host owns (an external or agentless endpoint), and one edge per ordered pair of those
// carrying every connection between them. Pure: no DOM, no cytoscape.

/** The host id a `svc:HOST/proto/port` id belongs to. */
function serviceHost(id) {
  const rest = id.slice('svc:'.length);
  const slash = rest.indexOf('/');
  return `host:${slash < 0 ? rest : rest.slice(0, slash)}`;
}

/** `label.KEY` properties as {KEY: value}. */
export function labelsOf(properties) {
  const out = {};
  for (const [k, v] of Object.entries(properties || {})) {
    if (k.startsWith('label.')) out[k.slice('label.'.length)] = v;
  }
  return out;
}

/**
 * The folded graph.
 * nodes: Map id → {id, kind: 'host'|'external', name (agent id or IP), label (agent id or IP/DNS),
 *   state (agent_state or null), labels, addresses: [{ip, dns, conflict?}], services: [{name, port, protocol, process}]}
 * edges: Map `FROM->TO` → {id, from, to, conns: [{port, protocol, process, sockets, active, control_plane, via, traffic}]}
 *   (`via`: the address the client dialled when NAT took the connection there, '' otherwise;
 *   traffic: the API's edge traffic {bytes_sent, bytes_received, srtt_us, min_rtt_us, retransmits, …} or null)
 */
export function fold(raw) {
  const nodes = new Map();
  const owner = new Map();
  const rawById = new Map((raw.nodes || []).map((n) => [n.id, n]));

  const host = (id) => {
    let n = nodes.get(id);
    if (!n) {
      // A service or address edge naming a host the graph does not list: draw it all the same.
      const name = id.slice('host:'.length);
      n = { id, kind: 'host', name, label: name, state: null, labels: {}, properties: {}, addresses: [], services: [] };
      nodes.set(id, n);
    }
    return n;
  };

  for (const n of raw.nodes || []) {
    if (n.kind !== 'host') continue;
    const p = n.properties || {};
    nodes.set(n.id, {
      id: n.id,
      kind: 'host',
      name: n.name,
      // The agent id: unique, where hostnames may repeat (cloned VMs, containers).
      label: n.name,
      hostname: p.hostname || '',
      state: p.agent_state || null,
      labels: labelsOf(p),
      properties: p,
      addresses: [],
      services: [],
    });
    owner.set(n.id, n.id);
  }
  for (const e of raw.edges || []) {
    if (e.kind === 'HAS_ADDRESS' && e.from.startsWith('host:')) {
      const h = host(e.from);
      owner.set(e.to, h.id);
      const a = rawById.get(e.to);
      const ip = a ? a.name : e.to.slice('addr:'.length);
      const p = (a && a.properties) || {};
      // `conflict`: another agent claims this address too (the controller names them).
      if (!h.addresses.some((x) => x.ip === ip)) h.addresses.push({ ip, dns: p.dns || null, ...(p.conflict ? { conflict: p.conflict } : {}) });
    }
  }
  for (const n of raw.nodes || []) {
    if (n.kind === 'service') {
      const h = host(owner.get(n.id) || serviceHost(n.id));
      owner.set(n.id, h.id);
      const p = n.properties || {};
      h.services.push({ name: n.name, port: Number(p.port) || null, protocol: p.protocol || '', process: p.process || '' });
    } else if (n.kind === 'address' && !owner.has(n.id)) {
      const p = n.properties || {};
      nodes.set(n.id, {
        id: n.id,
        kind: 'external',
        name: n.name,
        label: p.dns ? `${p.dns} (${n.name})` : n.name,
        state: null,
        labels: labelsOf(p),
        properties: p,
        addresses: [{ ip: n.name, dns: p.dns || null }],
        services: [],
      });
      owner.set(n.id, n.id);
    }
  }

  const ownerOf = (id) => {
    if (owner.has(id)) return owner.get(id);
    if (id.startsWith('host:')) return host(id).id;
    if (id.startsWith('svc:')) return host(serviceHost(id)).id;
    return null;
  };

  const edges = new Map();
  for (const e of raw.edges || []) {
    if (e.kind !== 'CONNECTS_TO') continue;
    const from = ownerOf(e.from);
    const to = ownerOf(e.to);
    if (!from || !to || from === to) continue;
    const id = `${from}->${to}`;
    let agg = edges.get(id);
    if (!agg) {
      agg = { id, from, to, conns: [] };
      edges.set(id, agg);
    }
    agg.conns.push({
      port: e.port,
      protocol: e.protocol,
      process: e.process || '',
      // Why the process is unknown, as the client's agent said ("process unknown: no BPF on this host").
      process_note: e.process_note || '',
      sockets: e.sockets || 0,
      active: e.active !== false,
      control_plane: !!e.control_plane,
      via: e.via || '',
      traffic: e.traffic || null,
    });
  }
  for (const n of nodes.values()) {
    n.addresses.sort((a, b) => cmp(a.ip, b.ip));
    n.services.sort((a, b) => (a.port || 0) - (b.port || 0) || cmp(a.protocol, b.protocol));
  }
  for (const e of edges.values()) {
    e.conns.sort((a, b) => a.port - b.port || cmp(a.protocol, b.protocol) || cmp(a.process, b.process));
  }
  return { generation: raw.generation ?? 0, nodes, edges };
}

export function cmp(a, b) {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Every label key present on any node, sorted. */
export function labelKeys(folded) {
  const keys = new Set();
  for (const n of folded.nodes.values()) for (const k of Object.keys(n.labels)) keys.add(k);
  return [...keys].sort();
}

/** The key to colour by when the operator has not chosen one: `role` if present, else the first. */
export function defaultColourKey(keys) {
  return keys.includes('role') ? 'role' : keys[0] || '';
}
