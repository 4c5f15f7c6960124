// The map page's time slider and changes view: the map as it was at a time, and what appeared and
// went since, from the controller's history (api/v1/history, read when first asked for and again after
// each `edge` event). The slider's right end is "now": the live map.
import { el } from './format.js';
import { changesBetween, changeText, graphAt } from './history.js';

const STEPS = 1000;
const DAY_MS = 86_400_000;

/**
 * `root`: the map page; `load()`: fetches api/v1/history; `redraw()`: asks the page to draw again
 * (it calls `graphFor` with the live graph).
 */
export function createTimeline(root, { load, redraw }) {
  const $ = (sel) => root.querySelector(sel);
  const slider = $('#time-slider');
  const label = $('#time-label');
  const back = $('#time-now');
  const toggle = $('#changes-toggle');
  const panel = $('#changes');
  const state = { history: null, loading: null, at: null, stale: false };

  async function history() {
    if (state.history && !state.stale) return state.history;
    state.loading ??= load()
      .then((h) => {
        state.history = h;
        state.stale = false;
        return h;
      })
      .finally(() => {
        state.loading = null;
      });
    return state.loading;
  }

  function timeOf(value, h) {
    if (Number(value) >= STEPS) return null;
    return Math.round(h.horizon + (Number(value) / STEPS) * (h.now - h.horizon));
  }

  function renderLabel() {
    label.textContent = state.at === null ? 'now (live)' : new Date(state.at).toISOString().replace('.000Z', 'Z');
    label.className = state.at === null ? 'muted' : 'past';
    back.disabled = state.at === null;
  }

  function renderPanel() {
    if (panel.hidden || !state.history) return;
    const h = state.history;
    const since = state.at ?? Math.max(h.horizon, h.now - DAY_MS);
    const { added, gone, between } = changesBetween(h.changes, since, h.now);
    const section = (title, list) =>
      el(
        'div',
        {},
        el('h3', {}, `${title} (${list.length})`),
        list.length
          ? el('ul', { class: 'changes-list' }, list.map((c) => el('li', { title: new Date(c.at).toISOString() }, `${c.kind}: ${changeText(c)}`)))
          : el('p', { class: 'muted' }, 'none'),
      );
    panel.replaceChildren(
      el('h2', {}, `Changes since ${new Date(since).toISOString().replace('.000Z', 'Z')}`),
      section('New', added),
      section('Gone', gone),
      section('Came and went', between),
    );
  }

  slider.addEventListener('input', async () => {
    const h = await history().catch(() => null);
    if (!h) return;
    state.at = timeOf(slider.value, h);
    renderLabel();
    renderPanel();
    redraw();
  });
  back.addEventListener('click', () => {
    slider.value = String(STEPS);
    state.at = null;
    renderLabel();
    renderPanel();
    redraw();
  });
  toggle.addEventListener('click', async () => {
    panel.hidden = !panel.hidden;
    toggle.classList.toggle('active', !panel.hidden);
    if (!panel.hidden) {
      await history().catch(() => null);
      renderPanel();
    }
  });
  renderLabel();

  return {
    /** The graph to draw for the live `raw`: itself at "now", else the map at the slider's time. */
    graphFor(raw) {
      if (state.at === null || !state.history) return raw;
      return graphAt(raw, state.history.changes, state.at);
    },
    /** An `edge` event: history grew; read again when next needed (at once if the panel is open). */
    changed() {
      state.stale = true;
      if (!panel.hidden) history().then(renderPanel, () => {});
    },
    get at() {
      return state.at;
    },
  };
}
