import { App } from './app.js';

const app = new App(document);
app.start();
// For debugging from the console; the browser tests use it to force a refresh or a burst.
window.chatd = app;
