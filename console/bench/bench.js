// One measurement in one page: ?lib=cytoscape|cytoscape-webgl|sigma&frames=N&n=NODES.
// Draws the synthetic data-centre graph at preset positions (render time), animates pan and zoom for a
// fixed number of frames timed by requestAnimationFrame (frame rate), then lays the graph out once with
// ForceAtlas2 (graphology, Barnes-Hut, 100 iterations, from random positions) and redraws it (layout time;
// the same layout code for every library). The result lands in window.benchResult.
import cytoscape from 'cytoscape';
import Graph from 'graphology';
import Sigma from 'sigma';
import { EdgeArrowProgram } from 'sigma/rendering';
import forceAtlas2 from 'graphology-layout-forceatlas2';
import { dataCentre } from './datacentre.js';

const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
const colour = (n) => (n.kind === 'hub' ? '#222222' : n.kind === 'external' ? '#b8860b' : PALETTE[n.cluster % PALETTE.length]);

const frame = () => new Promise((resolve) => requestAnimationFrame(resolve));

/** Zoom (1 = fit) and pan offset (fraction of the drawing's size) for frame i: a circle while zooming in and out. */
function cameraAt(i) {
  const t = (i / 120) * 2 * Math.PI;
  return { zoom: 1 + 1.5 * (1 - Math.cos(t)), dx: 0.2 * Math.cos(t / 2), dy: 0.2 * Math.sin(t / 2) };
}

async function animate(frames, setCamera) {
  const intervals = [];
  let last = await frame();
  const start = last;
  for (let i = 0; i < frames; i++) {
    setCamera(cameraAt(i));
    const now = await frame();
    intervals.push(now - last);
    last = now;
  }
  intervals.sort((a, b) => a - b);
  return {
    fps: (frames * 1000) / (last - start),
    p95FrameMs: intervals[Math.floor(intervals.length * 0.95)],
  };
}

/** ForceAtlas2 positions {id: {x, y}} from random starting points. */
function layout(g) {
  const graph = new Graph();
  for (const n of g.nodes) graph.addNode(n.id, { x: Math.random() * 1000, y: Math.random() * 1000 });
  for (const e of g.edges) graph.mergeEdge(e.source, e.target);
  const settings = { ...forceAtlas2.inferSettings(graph), barnesHutOptimize: true };
  forceAtlas2.assign(graph, { iterations: 100, settings });
  const pos = {};
  graph.forEachNode((id, a) => { pos[id] = { x: a.x, y: a.y }; });
  return pos;
}

async function runCytoscape(g, frames, webgl) {
  const container = document.getElementById('graph');
  const t0 = performance.now();
  const cy = cytoscape({
    container,
    renderer: { name: 'canvas', webgl },
    elements: [
      ...g.nodes.map((n) => ({ group: 'nodes', data: { id: n.id, label: n.label, colour: colour(n), kind: n.kind }, position: { x: n.x, y: n.y } })),
      ...g.edges.map((e) => ({ group: 'edges', data: e })),
    ],
    layout: { name: 'preset' },
    style: [
      { selector: 'node', style: { 'background-color': 'data(colour)', width: 14, height: 14, label: 'data(label)', 'font-size': 10, 'min-zoomed-font-size': 8 } },
      { selector: 'node[kind = "hub"]', style: { width: 30, height: 30 } },
      { selector: 'node[kind = "external"]', style: { shape: 'diamond' } },
      { selector: 'edge', style: { width: 1, 'line-color': '#b0b0b0', 'curve-style': 'straight', 'target-arrow-shape': 'triangle', 'target-arrow-color': '#b0b0b0', 'arrow-scale': 0.6 } },
    ],
  });
  cy.fit();
  await frame();
  await frame();
  const renderMs = performance.now() - t0;
  const zoom0 = cy.zoom();
  const bb = cy.elements().boundingBox();
  const w = container.clientWidth;
  const h = container.clientHeight;
  const anim = await animate(frames, ({ zoom, dx, dy }) => {
    const z = zoom0 * zoom;
    const mx = bb.x1 + bb.w * (0.5 + dx);
    const my = bb.y1 + bb.h * (0.5 + dy);
    cy.viewport({ zoom: z, pan: { x: w / 2 - z * mx, y: h / 2 - z * my } });
  });
  const t1 = performance.now();
  const pos = layout(g);
  cy.nodes().positions((n) => pos[n.id()]);
  cy.fit();
  await frame();
  const layoutMs = performance.now() - t1;
  return { renderMs, layoutMs, ...anim };
}

async function runSigma(g, frames) {
  const container = document.getElementById('graph');
  const t0 = performance.now();
  const graph = new Graph({ type: 'directed' });
  for (const n of g.nodes) {
    graph.addNode(n.id, { label: n.label, x: n.x, y: -n.y, size: n.kind === 'hub' ? 10 : 4, color: colour(n) });
  }
  for (const e of g.edges) graph.addDirectedEdgeWithKey(e.id, e.source, e.target, { size: 1, color: '#b0b0b0' });
  const sigma = new Sigma(graph, container, { defaultEdgeType: 'arrow', edgeProgramClasses: { arrow: EdgeArrowProgram } });
  await frame();
  await frame();
  const renderMs = performance.now() - t0;
  const camera = sigma.getCamera();
  const anim = await animate(frames, ({ zoom, dx, dy }) => {
    camera.setState({ x: 0.5 + dx, y: 0.5 + dy, ratio: 1 / zoom, angle: 0 });
  });
  const t1 = performance.now();
  const pos = layout(g);
  graph.forEachNode((id) => graph.mergeNodeAttributes(id, pos[id]));
  camera.setState({ x: 0.5, y: 0.5, ratio: 1, angle: 0 });
  sigma.refresh();
  await frame();
  const layoutMs = performance.now() - t1;
  return { renderMs, layoutMs, ...anim };
}

async function main() {
  const q = new URLSearchParams(location.search);
  const lib = q.get('lib') || 'cytoscape';
  const frames = Number(q.get('frames') || 300);
  const g = dataCentre(Number(q.get('n') || 2000));
  try {
    const r = lib === 'sigma' ? await runSigma(g, frames) : await runCytoscape(g, frames, lib === 'cytoscape-webgl');
    window.benchResult = { lib, nodes: g.nodes.length, edges: g.edges.length, frames, ...r };
  } catch (e) {
    window.benchResult = { lib, error: String(e && e.stack ? e.stack : e) };
  }
}

main();
