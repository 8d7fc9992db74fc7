// Runs: every run under out_dir, newest first, filtered by stage and arch; pipelines.
import { getJSON } from "./api.js";
import { ago, badge, clock, h, number, runLink } from "./dom.js";

const REFRESH_MS = 3000;

function options(select, values, chosen) {
  select.replaceChildren(h("option", { value: "" }, "all"));
  for (const value of values) select.append(h("option", { value, selected: value === chosen }, value));
}

export async function render(root, params) {
  const selected = new Set();
  const stage = h("select", { name: "stage" });
  const arch = h("select", { name: "arch" });
  const compare = h("button", { type: "button", disabled: true }, "Compare selected");
  const body = h("tbody");
  const pipelines = h("ul", { class: "pipelines" });
  let runs = [];

  const filters = () => ({ stage: stage.value, arch: arch.value });
  const saveFilters = () => {
    const query = new URLSearchParams(Object.entries(filters()).filter(([, v]) => v));
    history.replaceState(null, "", `#/runs${query.size ? `?${query}` : ""}`);
    draw();
  };
  stage.addEventListener("change", saveFilters);
  arch.addEventListener("change", saveFilters);
  compare.addEventListener("click", () => {
    location.hash = `#/compare?${new URLSearchParams({ runs: [...selected].join(",") })}`;
  });

  function row(run) {
    const box = h("input", {
      type: "checkbox",
      checked: selected.has(run.id),
      onchange: (event) => {
        event.target.checked ? selected.add(run.id) : selected.delete(run.id);
        compare.disabled = selected.size < 2;
      },
    });
    const val = run.val["val/loss"];
    return h(
      "tr",
      { dataset: { run: run.id } },
      h("td", {}, box),
      h("td", {}, runLink(run.id, run.pipeline ? run.name : run.id)),
      h("td", {}, run.pipeline ? h("a", { href: `#/pipeline?${new URLSearchParams({ id: run.pipeline })}` }, run.pipeline) : "–"),
      h("td", {}, run.stage ?? "–"),
      h("td", {}, run.arch ?? "–"),
      h("td", {}, run.model ?? "–"),
      h("td", {}, run.data ?? "–"),
      h("td", {}, badge(run.state, run.error)),
      h("td", { class: "num" }, `${number(run.step)} / ${number(run.max_steps)}`),
      h("td", { class: "num" }, val === undefined ? "–" : number(val)),
      h("td", {}, clock(run.started)),
      h("td", {}, ago(run.updated)),
    );
  }

  function draw() {
    const { stage: s, arch: a } = filters();
    const shown = runs.filter((r) => (!s || r.stage === s) && (!a || r.arch === a));
    body.replaceChildren(...shown.map(row));
    if (!shown.length) body.append(h("tr", {}, h("td", { colspan: 12, class: "muted" }, "no runs yet")));
  }

  async function load() {
    const data = await getJSON("/api/runs");
    document.getElementById("out-dir").textContent = data.out_dir;
    runs = data.runs;
    const keep = filters();
    const distinct = (key) => [...new Set(runs.map((r) => r[key]).filter(Boolean))].sort();
    options(stage, distinct("stage"), keep.stage || params.stage);
    options(arch, distinct("arch"), keep.arch || params.arch);
    pipelines.replaceChildren(
      ...data.pipelines.map((id) => h("li", {}, h("a", { href: `#/pipeline?${new URLSearchParams({ id })}` }, id))),
    );
    if (!data.pipelines.length) pipelines.append(h("li", { class: "muted" }, "none"));
    draw();
  }

  const head = ["", "run", "pipeline", "stage", "arch", "model", "data", "status", "steps", "val loss", "started", "updated"];
  root.append(
    h("h1", {}, "Runs"),
    h("div", { class: "bar" }, h("label", {}, "stage ", stage), h("label", {}, "arch ", arch), compare),
    h("table", { class: "runs" }, h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))), body),
    h("h2", {}, "Pipelines"),
    pipelines,
  );
  await load();
  const timer = setInterval(() => load().catch(() => {}), REFRESH_MS);
  return () => clearInterval(timer);
}
