// Small inline SVG icons (no icon font, no emoji font needed): ticks, the
// message actions (reply, react, edit, delete), close, group info, the
// end-to-end lock, shield and device, the logo.

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
  reply: () =>
    svg('0 0 16 16', [['path', { d: 'M6.5 3.5L2.5 7.5l4 4M2.8 7.5h6.4a4.3 4.3 0 0 1 4.3 4.3v.7', ...stroke }]], 'icon'),
  react: () =>
    svg('0 0 16 16', [
      ['circle', { cx: '8', cy: '8', r: '6.2', ...stroke }],
      ['path', { d: 'M5.4 9.6a3 3 0 0 0 5.2 0', ...stroke }],
      ['circle', { cx: '5.9', cy: '6.4', r: '0.9', fill: 'currentColor' }],
      ['circle', { cx: '10.1', cy: '6.4', r: '0.9', fill: 'currentColor' }],
    ], 'icon'),
  edit: () =>
    svg('0 0 16 16', [['path', { d: 'M10.6 2.8l2.6 2.6-7.7 7.7-3.3.7.7-3.3zM9.2 4.2l2.6 2.6', ...stroke }]], 'icon'),
  trash: () =>
    svg('0 0 16 16', [
      ['path', { d: 'M2.8 4.3h10.4M6.3 4.2V2.8h3.4v1.4M4.1 4.3l.7 9h6.4l.7-9M6.7 6.7v4.4M9.3 6.7v4.4', ...stroke }],
    ], 'icon'),
  info: () =>
    svg('0 0 16 16', [
      ['circle', { cx: '8', cy: '8', r: '6.2', ...stroke }],
      ['path', { d: 'M8 7.3v4', ...stroke }],
      ['circle', { cx: '8', cy: '4.9', r: '0.9', fill: 'currentColor' }],
    ], 'icon'),
  lock: () =>
    svg('0 0 16 16', [
      ['rect', { x: '3.2', y: '7.2', width: '9.6', height: '6.8', rx: '1.4', fill: 'currentColor' }],
      ['path', { d: 'M5.4 7.2V5.3a2.6 2.6 0 0 1 5.2 0v1.9', ...stroke, 'stroke-width': '1.6' }],
    ], 'icon icon-lock'),
  shield: () =>
    svg('0 0 16 16', [
      ['path', { d: 'M8 1.8l5 1.9v4c0 3.1-2.1 5.4-5 6.5-2.9-1.1-5-3.4-5-6.5v-4z', ...stroke }],
      ['path', { d: 'M5.7 8l1.6 1.6 3-3.1', ...stroke }],
    ], 'icon'),
  device: () =>
    svg('0 0 16 16', [
      ['rect', { x: '2', y: '3', width: '12', height: '8', rx: '1.2', ...stroke }],
      ['path', { d: 'M5.5 13.5h5M8 11v2.5', ...stroke }],
    ], 'icon icon-device'),
  close: () => svg('0 0 16 16', [['path', { d: 'M4 4l8 8M12 4l-8 8', ...stroke }]], 'icon'),
  logo: () =>
    svg('0 0 64 64', [
      ['rect', { width: '64', height: '64', rx: '14', fill: '#0f6e5c' }],
      ['path', { d: 'M16 18h32a4 4 0 0 1 4 4v18a4 4 0 0 1-4 4H30l-10 8v-8h-4a4 4 0 0 1-4-4V22a4 4 0 0 1 4-4z', fill: '#fff' }],
    ], 'logo'),
};
