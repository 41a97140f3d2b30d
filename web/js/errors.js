// What each error code means to a person. Every code of the wire contract is here.

export const ERROR_TITLES = {
  bad_request: 'Request refused',
  unauthorized: 'Not signed in',
  forbidden: 'Not allowed',
  not_found: 'Not found',
  too_large: 'Too large',
  rate_limited: 'Slow down',
  unavailable: 'Service unavailable',
  internal: 'Server error',
  conflict: 'Already taken',
  network: 'Offline',
};

export const ERROR_HINTS = {
  bad_request: 'The server could not accept this.',
  unauthorized: 'Your session is not valid any more; please log in again.',
  forbidden: 'You are not a member of this conversation.',
  not_found: 'It does not exist (check the username).',
  too_large: 'Messages are limited to 4,000 characters.',
  rate_limited: 'You are sending too fast. Wait a moment, then retry.',
  unavailable: 'The server is busy or restarting. Try again shortly.',
  internal: 'Something went wrong on the server. Try again.',
  conflict: 'That name is already taken.',
  network: 'The server cannot be reached.',
};

export function errorTitle(code) {
  return ERROR_TITLES[code] || 'Error';
}

/** One line for a person: the server's own message, else a hint for the code. */
export function errorText(code, message) {
  const hint = ERROR_HINTS[code] || 'Something went wrong.';
  if (!message) return hint;
  return message.endsWith('.') ? message : `${message}.`;
}
