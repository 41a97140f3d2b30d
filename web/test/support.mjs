// What the state layer's tests share (web/test/*.test.mjs): deep-frozen
// states, and a state that follows its updates. No tests here (`node
// --test` runs this module too, and finds none).

import { Draft } from '../js/state.js';

/** Make a Map or Set refuse changes (Object.freeze alone does not stop set, add, delete, clear). */
function lock(collection) {
  for (const method of ['set', 'add', 'delete', 'clear']) {
    if (typeof collection[method] !== 'function') continue;
    Object.defineProperty(collection, method, {
      value: () => {
        throw new TypeError(`${method} on a frozen ${collection.constructor.name}`);
      },
    });
  }
}

/**
 * Freeze `value` and everything in it (objects, arrays, maps, sets, their
 * keys and values); returns it. What is frozen already was frozen here
 * (with all it holds), or holds nothing to freeze.
 */
export function deepFreeze(value) {
  if (value === null || typeof value !== 'object' || Object.isFrozen(value)) return value;
  const collection = value instanceof Map || value instanceof Set;
  if (collection) lock(value);
  Object.freeze(value); // before what it holds: a way back to it stops here
  for (const v of collection ? [...value.entries()].flat() : Object.values(value)) deepFreeze(v);
  return value;
}

/**
 * A state that follows its updates: `t.do(update, ...args)` applies `update`
 * to `t.s`, deep-frozen first (with its arguments: an update that changes
 * what it is given throws), keeps the new state and returns the answer.
 * `t.setUp(fn)` changes the state for a test through a Draft.
 */
export function follow(state) {
  return {
    s: state,
    do(update, ...args) {
      const r = update(deepFreeze(this.s), ...args.map((a) => deepFreeze(a)));
      this.s = r.state;
      return r;
    },
    setUp(fn) {
      const d = new Draft(deepFreeze(this.s));
      fn(d);
      this.s = d.done().state;
    },
  };
}
