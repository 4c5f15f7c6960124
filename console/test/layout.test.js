import { describe, expect, it } from 'vitest';
import { layout, separate, MIN_GAP } from '../src/layout.js';
import { fold } from '../src/fold.js';
import { visibleGraph } from '../src/view.js';
import { graph } from '../dev/fixture.js';

function closest(pos) {
  const ps = [...pos.values()];
  let min = Infinity;
  for (let i = 0; i < ps.length; i++) for (let j = i + 1; j < ps.length; j++) min = Math.min(min, Math.hypot(ps[i].x - ps[j].x, ps[i].y - ps[j].y));
  return min;
}

describe('layout', () => {
  it('places every visible node, apart, the same way twice', () => {
    const view = visibleGraph(fold(graph()));
    const a = layout(view);
    expect([...a.keys()].sort()).toEqual([...view.nodes.keys()].sort());
    expect(closest(a)).toBeGreaterThan(MIN_GAP * 0.9);
    expect(layout(view)).toEqual(a);
  });

  it('separates nodes on the same spot', () => {
    const p = separate(
      new Map([
        ['a', { x: 0, y: 0 }],
        ['b', { x: 0, y: 0 }],
        ['c', { x: 10, y: 0 }],
      ]),
      40,
    );
    expect(closest(p)).toBeGreaterThan(35);
  });
});
