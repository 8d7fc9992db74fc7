// The page shell: a hash router over the views (#/runs, #/run?id=, #/compare?runs=,
// #/pipeline?id=, #/chat?run=&checkpoint=).
import * as chat from "./chat.js";
import * as compare from "./compare.js";
import { h } from "./dom.js";
import * as pipeline from "./pipeline.js";
import * as run from "./run.js";
import * as runs from "./runs.js";

const VIEWS = { "": runs, runs, run, compare, pipeline, chat };
const NAV = { "": "runs", runs: "runs", run: "runs", pipeline: "runs", compare: "compare", chat: "chat" };
const root = document.getElementById("view");
let cleanup = null;
let generation = 0;

async function route() {
  const mine = ++generation;
  cleanup?.();
  cleanup = null;
  const [name, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const params = Object.fromEntries(new URLSearchParams(query));
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === NAV[name]);
  }
  root.replaceChildren();
  const view = VIEWS[name];
  if (!view) {
    root.append(h("p", { class: "error" }, `no page ${name}`));
    return;
  }
  try {
    const done = await view.render(root, params);
    if (mine === generation) cleanup = done;
    else done?.(); // the user moved on while the view was loading
  } catch (error) {
    if (mine === generation) root.append(h("p", { class: "error" }, error.message));
  }
}

window.addEventListener("hashchange", route);
route();
