import { describe, expect, it } from 'vitest';
import { diff, placeNew } from '../src/diff.js';

describe('diff', () => {
  it('adds, removes and updates by id', () => {
    const prev = new Map([
      ['a', { id: 'a', label: 'A' }],
      ['b', { id: 'b', label: 'B' }],
    ]);
    const next = new Map([
      ['a', { id: 'a', label: 'A' }],
      ['b', { id: 'b', label: 'B2' }],
      ['c', { id: 'c', label: 'C' }],
    ]);
    expect(diff(prev, next)).toEqual({ add: [{ id: 'c', label: 'C' }], remove: [], update: [{ id: 'b', label: 'B2' }] });
    expect(diff(next, new Map())).toEqual({ add: [], remove: ['a', 'b', 'c'], update: [] });
  });
});

describe('placeNew', () => {
  const placed = new Map([
    ['a', { x: 0, y: 0 }],
    ['b', { x: 100, y: 0 }],
  ]);
  const fixed = () => 0;

  it('puts a new node near its placed neighbours', () => {
    const p = placeNew(['n'], placed, new Map([['n', ['a', 'b']]]), fixed).get('n');
    expect(Math.hypot(p.x - 50, p.y - 0)).toBeLessThanOrEqual(70);
  });

  it('grows chains of new nodes from the drawing, and puts loners in a column on the right', () => {
    const nb = new Map([
      ['n2', ['n1']],
      ['n1', ['a', 'n2']],
    ]);
    const p = placeNew(['n2', 'n1', 'lone'], placed, nb, fixed);
    expect(Math.hypot(p.get('n1').x, p.get('n1').y)).toBeLessThanOrEqual(70);
    expect(Math.hypot(p.get('n2').x - p.get('n1').x, p.get('n2').y - p.get('n1').y)).toBeLessThanOrEqual(70);
    expect(p.get('lone').x).toBeGreaterThan(100);
    expect(p.has('a')).toBe(false);
  });
});
