// The map's history (api/v1/history) read back: the map at a time, and what changed between two
// times, for the time slider and the changes view. Pure; the same rules as `tapgraph::history`.

/** Items present at `at` (Unix ms), by id → the change that made each appear. `changes` oldest first. */
export function presentAt(changes, at) {
  const present = new Map();
  for (const c of changes) {
    if (c.at > at) break;
    if (c.kind === 'traffic') continue;
    if (c.appeared) present.set(c.id, c);
    else present.delete(c.id);
  }
  return present;
}

/**
 * What changed in (from, to]: {added, gone, between}, each oldest first. `added`: present at `to` and
 * not at `from`; `gone`: the reverse (with the change that made it go); `between`: present at neither
 * end but in between (a nightly job's connection), with its first appearance.
 */
export function changesBetween(changes, from, to) {
  const before = presentAt(changes, from);
  const after = presentAt(changes, to);
  const goneAt = new Map();
  const firstIn = new Map();
  for (const c of changes) {
    if (c.at <= from || c.at > to || c.kind === 'traffic') continue;
    if (c.appeared) {
      if (!firstIn.has(c.id)) firstIn.set(c.id, c);
    } else goneAt.set(c.id, c);
  }
  const byTime = (a, b) => a.at - b.at || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
  const added = [...after].filter(([id]) => !before.has(id)).map(([, c]) => c);
  const gone = [...before.keys()].filter((id) => !after.has(id)).map((id) => goneAt.get(id)).filter(Boolean);
  const between = [...firstIn].filter(([id]) => !before.has(id) && !after.has(id)).map(([, c]) => c);
  return { added: added.sort(byTime), gone: gone.sort(byTime), between: between.sort(byTime) };
}

/**
 * The raw graph (api/v1/graph's shape) as it was at `at`: today's nodes and structural edges, and the
 * CONNECTS_TO edges history holds present then, with the nodes they need that are gone since.
 */
export function graphAt(raw, changes, at) {
  const edges = raw.edges.filter((e) => e.kind !== 'CONNECTS_TO');
  const nodes = new Map(raw.nodes.map((n) => [n.id, n]));
  for (const c of presentAt(changes, at).values()) {
    if (c.kind !== 'edge') continue;
    for (const id of [c.from, c.to]) if (!nodes.has(id)) nodes.set(id, placeholder(id));
    edges.push({
      from: c.from,
      to: c.to,
      kind: 'CONNECTS_TO',
      port: c.port,
      protocol: c.protocol,
      process: c.process,
      via: c.via,
      sockets: 1,
      active: true,
      control_plane: false,
    });
  }
  return { ...raw, nodes: [...nodes.values()], edges };
}

/** A node the map no longer has, from its id: `host:web`, `addr:10.0.0.9`, `svc:db/tcp/5432`. */
function placeholder(id) {
  const [prefix, rest] = [id.slice(0, id.indexOf(':')), id.slice(id.indexOf(':') + 1)];
  if (prefix === 'svc') {
    const [host, protocol, port] = rest.split('/');
    return { id, kind: 'service', name: `${host}:${port}/${protocol}`, properties: { host, port, protocol } };
  }
  return { id, kind: prefix === 'host' ? 'host' : 'address', name: rest, properties: {} };
}

/** One change as a line of text. */
export function changeText(c) {
  if (c.kind === 'edge') {
    const process = c.process ? ` (${c.process})` : '';
    const via = c.via ? ` via ${c.via}` : '';
    return `${c.from} → ${c.to} ${c.port}/${c.protocol}${process}${via}`;
  }
  if (c.kind === 'listener') return `${c.agent} listens ${c.ip}:${c.port}/${c.protocol}${c.process ? ` (${c.process})` : ''}`;
  return `host ${c.agent}${c.hostname && c.hostname !== c.agent ? ` (${c.hostname})` : ''}`;
}
