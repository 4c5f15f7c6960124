// The console's entry: hash routes (#/map, #/fleet, #/policies), the data each page needs, live updates
// over server-sent events, and the read-only test hook `window.tapgraph`.
import './style.css';
import { api, subscribe, onUnauthorized, Unauthorized } from './api.js';
import { createMap } from './map.js';
import { createFleet } from './fleet.js';
import { createPolicies } from './policies.js';
import { createTimeline } from './timeline.js';

const PAGES = ['map', 'fleet', 'policies'];
const live = document.getElementById('live');
let closeEvents = () => {};

function showError(where, err) {
  if (err instanceof Unauthorized) return;
  live.textContent = `${where}: ${err.message || err}`;
  live.className = 'live error';
}

onUnauthorized(() => {
  closeEvents();
  for (const p of document.querySelectorAll('.page')) p.hidden = true;
  document.querySelector('.topbar nav').hidden = true;
  live.hidden = true;
  document.getElementById('page-denied').hidden = false;
  document.title = 'tapgraph console: access token required';
});

const map = createMap(document.getElementById('page-map'));
const fleet = createFleet(document.getElementById('page-fleet'));
const policies = createPolicies(document.getElementById('page-policies'));
// The live graph as last fetched: the time slider draws the map at another time from it.
let liveGraph = null;
const timeline = createTimeline(document.getElementById('page-map'), {
  load: () => api.history(),
  redraw: () => {
    if (liveGraph) map.setGraph(timeline.graphFor(liveGraph));
  },
});

/**
 * Fetches coalesced: one request in flight per resource, one more after it if asked meanwhile, and at
 * least `gapMs` between two (a busy fleet changes the map several times a second).
 */
function coalesced(fn, gapMs = 0) {
  let running = null;
  let again = false;
  const pause = () => new Promise((resolve) => setTimeout(resolve, gapMs));
  const run = async () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        do {
          again = false;
          await fn();
          if (again && gapMs) await pause();
        } while (again);
      } finally {
        running = null;
      }
    })();
    return running;
  };
  return run;
}

const GRAPH_REFETCH_GAP_MS = 1000;

const loadGraph = coalesced(async () => {
  try {
    liveGraph = await api.graph();
    map.setGraph(timeline.graphFor(liveGraph));
    hook.ready = map.drawn;
    hook.generation = map.generation;
  } catch (e) {
    showError('graph', e);
  }
}, GRAPH_REFETCH_GAP_MS);

const loadFleet = coalesced(async () => {
  try {
    const [agents, mirror] = await Promise.all([api.agents(), api.mirror().catch(() => null)]);
    fleet.set(agents, mirror);
  } catch (e) {
    showError('agents', e);
  }
});

const loadPolicies = coalesced(async () => {
  try {
    policies.set(await api.policies());
  } catch (e) {
    showError('policies', e);
  }
});

function route() {
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1];
  const page = PAGES.includes(name) ? name : 'map';
  if (!name || name !== page) history.replaceState(null, '', '#/map');
  for (const p of PAGES) document.getElementById(`page-${p}`).hidden = p !== page;
  for (const a of document.querySelectorAll('.topbar nav a')) a.classList.toggle('active', a.dataset.route === page);
  document.body.dataset.page = page;
  if (page === 'map') map.shown();
  if (page === 'fleet') loadFleet();
  if (page === 'policies') loadPolicies();
}

// Read-only view of the drawing, for the browser tests (kept in the shipped build on purpose).
const hook = {
  ready: false,
  generation: 0,
  ...map.hook(),
};
window.tapgraph = hook;

window.addEventListener('hashchange', route);
route();
loadGraph();

closeEvents = subscribe({
  status(s) {
    live.textContent = s === 'live' ? 'live' : 'reconnecting…';
    live.className = `live ${s === 'live' ? 'ok' : 'warn'}`;
  },
  graph() {
    // Always refetch: an agent's state (drawn on its node) changes without a new generation.
    loadGraph();
  },
  fleet() {
    // Rollout status changes as agents apply their policy: the policies page follows the fleet too.
    if (document.body.dataset.page === 'fleet') loadFleet();
    if (document.body.dataset.page === 'policies') loadPolicies();
  },
  event(e) {
    fleet.event(e);
    if (e.kind === 'edge') timeline.changed();
    if (e.kind === 'policy' && document.body.dataset.page === 'policies') loadPolicies();
  },
});
