// What changes in the drawing when the visible graph changes: elements to add, remove and update, so a
// live update never rebuilds the picture nor moves a node that stays. Pure.

/** Shallow structural equality of two data objects (values compared as JSON). */
function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

/**
 * prev, next: Map id → data (plain, JSON-able). Returns {add: [data], remove: [id], update: [data]}.
 * `update` lists the elements whose data changed; their position is not the diff's business.
 */
export function diff(prev, next) {
  const add = [];
  const update = [];
  const remove = [];
  for (const [id, data] of next) {
    if (!prev.has(id)) add.push(data);
    else if (!same(prev.get(id), data)) update.push(data);
  }
  for (const id of prev.keys()) if (!next.has(id)) remove.push(id);
  return { add, remove, update };
}

/**
 * Where to put new nodes: near the placed neighbours' centre, a little apart; a node with none goes in a
 * column right of the drawing. `placed`: Map id → {x, y} of nodes that keep their place; `neighbours`:
 * id → [ids]. New nodes placed earlier in the list count as placed for later ones. `rand` in [0, 1).
 */
export function placeNew(newIds, placed, neighbours, rand = Math.random) {
  const pos = new Map(placed);
  const out = new Map();
  let x2 = -Infinity;
  let y1 = Infinity;
  for (const p of placed.values()) {
    x2 = Math.max(x2, p.x);
    y1 = Math.min(y1, p.y);
  }
  if (!Number.isFinite(x2)) {
    x2 = 0;
    y1 = 0;
  }
  let column = 0;
  // Nodes with placed neighbours first, so a chain of new nodes grows from the existing drawing.
  const pending = [...newIds];
  for (let round = 0; round < 3 && pending.length; round++) {
    for (let i = 0; i < pending.length; ) {
      const id = pending[i];
      const near = (neighbours.get(id) || []).map((n) => pos.get(n)).filter(Boolean);
      if (!near.length && round < 2) {
        i++;
        continue;
      }
      let p;
      if (near.length) {
        const cx = near.reduce((s, q) => s + q.x, 0) / near.length;
        const cy = near.reduce((s, q) => s + q.y, 0) / near.length;
        const a = 2 * Math.PI * rand();
        const r = 40 + 30 * rand();
        p = { x: cx + r * Math.cos(a), y: cy + r * Math.sin(a) };
      } else {
        p = { x: x2 + 120, y: y1 + 60 * column++ };
      }
      pos.set(id, p);
      out.set(id, p);
      pending.splice(i, 1);
    }
  }
  return out;
}
