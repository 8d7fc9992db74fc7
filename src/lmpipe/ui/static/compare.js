// Compare: several runs' curves of one metric on shared axes, by step or by tokens seen.
import { getJSON, url } from "./api.js";
import { h, number, runLink } from "./dom.js";
import { LineChart, NOT_PLOTTED } from "./plot.js";

// Tokens seen at a step: interpolated between the train/tokens of logged steps (and
// extrapolated past the last); NaN (not drawn) for a run that logs no token counts.
export function tokensAt(records) {
  const logged = records.filter((r) => typeof r["train/tokens"] === "number");
  const known = [[0, 0], ...logged.map((r) => [r.step, r["train/tokens"]])];
  return (step) => {
    if (known.length < 2) return NaN;
    let i = known.findIndex(([s]) => s >= step);
    i = i === 0 ? 1 : i < 0 ? known.length - 1 : i;
    const [[s0, t0], [s1, t1]] = [known[i - 1], known[i]];
    return s1 === s0 ? t1 : t0 + ((step - s0) * (t1 - t0)) / (s1 - s0);
  };
}

export async function render(root, params) {
  const chosen = new Set((params.runs || "").split(",").filter(Boolean));
  const list = h("div", { class: "pick" });
  const metric = h("select", { name: "metric" });
  const axis = h("select", { name: "axis" }, h("option", { value: "step" }, "step"), h("option", { value: "tokens" }, "tokens"));
  axis.value = params.x === "tokens" ? "tokens" : "step";
  const chartBox = h("div", { class: "charts wide" });
  const summary = h("tbody");
  const records = new Map(); // run id -> records
  let chart = null;

  root.append(
    h("h1", {}, "Compare runs"),
    h("div", { class: "bar" }, h("label", {}, "metric ", metric), h("label", {}, "x axis ", axis)),
    chartBox,
    h("table", {}, h("thead", {}, h("tr", {}, ["run", "last", "min", "max", "points"].map((t) => h("th", {}, t)))), summary),
    h("h2", {}, "Runs"),
    list,
  );

  function saveQuery() {
    const query = new URLSearchParams({ runs: [...chosen].join(","), metric: metric.value, x: axis.value });
    history.replaceState(null, "", `#/compare?${query}`);
  }

  function metricOptions() {
    const keys = new Set();
    for (const id of chosen) for (const r of records.get(id) || []) for (const k of Object.keys(r)) if (!NOT_PLOTTED.has(k)) keys.add(k);
    const current = metric.value || params.metric || "train/loss";
    const sorted = [...keys].sort();
    metric.replaceChildren(...sorted.map((k) => h("option", { value: k, selected: k === current }, k)));
    if (!sorted.includes(current) && sorted.includes("val/loss")) metric.value = "val/loss";
  }

  function draw() {
    chart?.destroy();
    chart = new LineChart(chartBox, { title: metric.value || "no metric", xLabel: axis.value, group: "compare", height: 320 });
    summary.replaceChildren();
    for (const id of chosen) {
      const rows = records.get(id) || [];
      const x = axis.value === "tokens" ? tokensAt(rows) : (step) => step;
      const points = rows.filter((r) => typeof r[metric.value] === "number").map((r) => [x(r.step), r[metric.value]]);
      chart.set(id, points);
      const values = points.map(([, y]) => y);
      summary.append(
        h(
          "tr",
          {},
          h("td", {}, runLink(id)),
          h("td", { class: "num" }, number(values.at(-1))),
          h("td", { class: "num" }, values.length ? number(Math.min(...values)) : "–"),
          h("td", { class: "num" }, values.length ? number(Math.max(...values)) : "–"),
          h("td", { class: "num" }, values.length),
        ),
      );
    }
    chart.draw();
    saveQuery();
  }

  async function load(id) {
    if (!records.has(id)) records.set(id, (await getJSON(url("/api/run/metrics", { run: id }))).records);
  }

  async function toggle(id, on) {
    on ? chosen.add(id) : chosen.delete(id);
    if (on) await load(id);
    metricOptions();
    draw();
  }

  const { runs } = await getJSON("/api/runs");
  list.replaceChildren(
    ...runs.map((run) =>
      h(
        "label",
        {},
        h("input", { type: "checkbox", checked: chosen.has(run.id), onchange: (e) => toggle(run.id, e.target.checked) }),
        ` ${run.id} `,
        h("span", { class: "muted" }, [run.stage, run.arch, run.model, run.data].filter(Boolean).join(" · ")),
      ),
    ),
  );
  await Promise.all([...chosen].map(load));
  metricOptions();
  metric.addEventListener("change", draw);
  axis.addEventListener("change", draw);
  draw();
  return () => chart?.destroy();
}
