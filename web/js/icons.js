// Small inline SVG icons (no icon font, no emoji font needed).

const NS = 'http://www.w3.org/2000/svg';

function svg(viewBox, children, cls) {
  const el = document.createElementNS(NS, 'svg');
  el.setAttribute('viewBox', viewBox);
  el.setAttribute('aria-hidden', 'true');
  el.setAttribute('focusable', 'false');
  if (cls) el.setAttribute('class', cls);
  for (const [tag, attrs] of children) {
    const child = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) child.setAttribute(k, v);
    el.append(child);
  }
  return el;
}

const stroke = { fill: 'none', stroke: 'currentColor', 'stroke-width': '1.7', 'stroke-linecap': 'round', 'stroke-linejoin': 'round' };

export const icons = {
  pending: () =>
    svg('0 0 16 16', [
      ['circle', { cx: '8', cy: '8', r: '6.2', ...stroke, 'stroke-width': '1.4' }],
      ['path', { d: 'M8 4.6V8l2.3 1.5', ...stroke, 'stroke-width': '1.4' }],
    ], 'icon icon-clock'),
  sent: () => svg('0 0 16 12', [['path', { d: 'M2.5 6.6l3.4 3.2 7.4-7.6', ...stroke }]], 'icon icon-check'),
  delivered: () =>
    svg('0 0 20 12', [
      ['path', { d: 'M1.5 6.6l3.4 3.2 7.4-7.6', ...stroke }],
      ['path', { d: 'M8.6 9.4l.5.4 7.4-7.6', ...stroke }],
    ], 'icon icon-checks'),
  seen: () => icons.delivered(),
  failed: () =>
    svg('0 0 16 16', [
      ['circle', { cx: '8', cy: '8', r: '7', fill: 'currentColor' }],
      ['path', { d: 'M8 4.2v4.6', stroke: '#fff', 'stroke-width': '1.8', 'stroke-linecap': 'round' }],
      ['circle', { cx: '8', cy: '11.4', r: '1', fill: '#fff' }],
    ], 'icon icon-failed'),
  logo: () =>
    svg('0 0 64 64', [
      ['rect', { width: '64', height: '64', rx: '14', fill: '#0f6e5c' }],
      ['path', { d: 'M16 18h32a4 4 0 0 1 4 4v18a4 4 0 0 1-4 4H30l-10 8v-8h-4a4 4 0 0 1-4-4V22a4 4 0 0 1 4-4z', fill: '#fff' }],
    ], 'logo'),
};
