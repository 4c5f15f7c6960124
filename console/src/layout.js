// The map's layout: ForceAtlas2 (graphology) on the visible graph. Run once when the map is first drawn
// and when the operator asks; live updates never call it, they place new nodes near their neighbours.
import Graph from 'graphology';
import forceAtlas2 from 'graphology-layout-forceatlas2';

function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Positions Map id → {x, y} for `view` ({nodes: Map, edges: Map}), starting from `start` where given
 * (else from seeded random points, so a reload draws the same picture), scaled so neighbours sit about
 * 100 px apart at zoom 1.
 */
export function layout(view, start = new Map()) {
  const rand = seeded(1);
  const g = new Graph({ type: 'undirected', multi: false });
  const n = view.nodes.size;
  const spread = 10 * Math.sqrt(n + 1);
  for (const id of view.nodes.keys()) {
    const p = start.get(id);
    g.addNode(id, p ? { x: p.x / 10, y: p.y / 10 } : { x: (rand() - 0.5) * spread, y: (rand() - 0.5) * spread });
  }
  for (const e of view.edges.values()) if (e.from !== e.to) g.mergeEdge(e.from, e.to);
  if (n > 1) {
    const settings = { ...forceAtlas2.inferSettings(g), barnesHutOptimize: n > 300, adjustSizes: false };
    const iterations = n <= 100 ? 500 : n <= 500 ? 250 : 100;
    forceAtlas2.assign(g, { iterations, settings });
  }
  // FA2's unit is arbitrary: scale so the median edge is ~100 px.
  const lengths = [];
  g.forEachEdge((_, __, a, b, sa, ta) => lengths.push(Math.hypot(sa.x - ta.x, sa.y - ta.y)));
  lengths.sort((a, b) => a - b);
  const median = lengths.length ? lengths[Math.floor(lengths.length / 2)] : 0;
  const k = median > 0 ? 100 / median : 10;
  const out = new Map();
  g.forEachNode((id, a) => out.set(id, { x: a.x * k, y: a.y * k }));
  return separate(out, MIN_GAP);
}

/** Centres closer than this are pushed apart: a node is drawn 22-24 px wide, with its label below. */
export const MIN_GAP = 45;

/**
 * Pushes apart nodes whose centres are closer than `gap` (ForceAtlas2 lets a leaf sit on its only
 * neighbour), a few rounds over a grid of `gap`-sized cells so it stays linear in the node count.
 */
export function separate(positions, gap, rounds = 8) {
  const ids = [...positions.keys()];
  const p = new Map(ids.map((id) => [id, { ...positions.get(id) }]));
  for (let round = 0; round < rounds; round++) {
    const grid = new Map();
    const cell = (v) => Math.floor(v / gap);
    for (const id of ids) {
      const q = p.get(id);
      const key = `${cell(q.x)},${cell(q.y)}`;
      if (!grid.has(key)) grid.set(key, []);
      grid.get(key).push(id);
    }
    let moved = false;
    for (const id of ids) {
      const a = p.get(id);
      const cx = cell(a.x);
      const cy = cell(a.y);
      for (let dx = -1; dx <= 1; dx++) {
        for (let dy = -1; dy <= 1; dy++) {
          for (const other of grid.get(`${cx + dx},${cy + dy}`) || []) {
            if (other <= id) continue;
            const b = p.get(other);
            let vx = b.x - a.x;
            let vy = b.y - a.y;
            let d = Math.hypot(vx, vy);
            if (d >= gap) continue;
            if (d < 1e-6) {
              // Same spot: split along a direction derived from the ids, so the result is stable.
              const angle = (hash(id + other) % 360) * (Math.PI / 180);
              vx = Math.cos(angle);
              vy = Math.sin(angle);
              d = 1;
            } else {
              vx /= d;
              vy /= d;
            }
            const push = (gap - Math.min(d, gap)) / 2;
            a.x -= vx * push;
            a.y -= vy * push;
            b.x += vx * push;
            b.y += vy * push;
            moved = true;
          }
        }
      }
    }
    if (!moved) break;
  }
  return p;
}

function hash(s) {
  let h = 0;
  for (let i = 0; i < s.length; i++) h = (Math.imul(h, 31) + s.charCodeAt(i)) >>> 0;
  return h;
}
