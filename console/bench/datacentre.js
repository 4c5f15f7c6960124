// A synthetic data-centre graph for the frame-rate benchmark: clusters of hosts that talk inside their
// cluster, a few hubs every host talks to (DNS, NTP, monitoring, logging, the controller), and external
// endpoints. Deterministic (seeded), with preset positions so every library draws the same picture.

function rng(seed) {
  // mulberry32
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** {nodes: [{id, label, kind, cluster, x, y}], edges: [{id, source, target}]} with about `n` nodes and 2n edges. */
export function dataCentre(n = 2000, seed = 7) {
  const rand = rng(seed);
  const hubs = ['dns', 'ntp', 'monitoring', 'logging', 'controller'];
  const externals = Math.round(n * 0.075);
  const clusterSize = 45;
  const clusters = Math.floor((n - hubs.length - externals) / clusterSize);
  const hostsCount = n - hubs.length - externals;
  const nodes = [];
  const edges = [];
  const side = Math.ceil(Math.sqrt(clusters));
  const spacing = 400;
  const centre = ((side - 1) * spacing) / 2;
  hubs.forEach((h, i) => {
    const a = (2 * Math.PI * i) / hubs.length;
    nodes.push({ id: `host:${h}`, label: h, kind: 'hub', cluster: -1, x: centre + 60 * Math.cos(a), y: centre + 60 * Math.sin(a) });
  });
  const members = [];
  for (let i = 0; i < hostsCount; i++) {
    const c = i % clusters;
    const cx = (c % side) * spacing;
    const cy = Math.floor(c / side) * spacing;
    const r = 140 * Math.sqrt(rand());
    const a = 2 * Math.PI * rand();
    const id = `host:c${c}-h${i}`;
    nodes.push({ id, label: `c${c}-h${i}`, kind: 'host', cluster: c, x: cx + r * Math.cos(a), y: cy + r * Math.sin(a) });
    (members[c] ||= []).push(id);
  }
  const outer = centre * 1.6 + spacing;
  for (let i = 0; i < externals; i++) {
    const a = (2 * Math.PI * i) / externals;
    nodes.push({ id: `addr:203.0.${i >> 8}.${i & 255}`, label: `203.0.${i >> 8}.${i & 255}`, kind: 'external', cluster: -2, x: centre + outer * Math.cos(a), y: centre + outer * Math.sin(a) });
  }
  const seen = new Set();
  const edge = (source, target) => {
    const id = `${source}->${target}`;
    if (source === target || seen.has(id)) return false;
    seen.add(id);
    edges.push({ id, source, target });
    return true;
  };
  const pick = (arr) => arr[Math.floor(rand() * arr.length)];
  for (const group of members) {
    for (const h of group) {
      edge(h, `host:${pick(hubs)}`);
      // a tier talks to the next: one peer in its own cluster
      let tries = 0;
      while (!edge(h, pick(group)) && tries++ < 5);
    }
  }
  const hostIds = members.flat();
  const extIds = nodes.filter((x) => x.kind === 'external').map((x) => x.id);
  while (edges.length < 2 * n) edge(pick(hostIds), pick(extIds));
  return { nodes, edges };
}
