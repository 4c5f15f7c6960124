// Colours for label values: a fixed categorical palette that reads on a light background, assigned in
// the sorted order of the values present, so the same fleet gets the same colours on every load. Pure.

export const PALETTE = ['#2f6db5', '#e07b24', '#3a9a4a', '#8e5cb8', '#c2415b', '#1f9e9a', '#a07a2c', '#5d6ed6', '#d05fa8', '#6b8e23', '#7b5a46', '#4a90a4'];
export const NO_VALUE = '#c5cad1';

/** value → colour for every value of `key` among `nodes` (iterable of folded nodes). */
export function colourScale(nodes, key) {
  const values = new Set();
  if (key) for (const n of nodes) if (n.labels[key] !== undefined) values.add(n.labels[key]);
  const sorted = [...values].sort();
  return new Map(sorted.map((v, i) => [v, PALETTE[i % PALETTE.length]]));
}

export function colourOf(node, key, scale) {
  const v = key ? node.labels[key] : undefined;
  return v === undefined ? NO_VALUE : scale.get(v) || NO_VALUE;
}
