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
  return out;
}
