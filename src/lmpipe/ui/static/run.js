// One run: live curves (server-sent events tail metrics.jsonl), plan, config, checkpoints, episodes.
import { follow, getJSON, url } from "./api.js";
import { badge, h, number } from "./dom.js";
import { LineChart, NOT_PLOTTED, groupOrder, metricGroup, splitColor } from "./plot.js";

function checkpointTable(run, checkpoints) {
  if (!checkpoints.length) return h("p", { class: "muted" }, "no checkpoints yet");
  const keys = [...new Set(checkpoints.flatMap((c) => Object.keys(c.val)))].sort();
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, h("th", {}, "checkpoint"), keys.map((k) => h("th", { class: "num" }, k)), h("th", {}, ""))),
    h(
      "tbody",
      {},
      checkpoints.map((c) =>
        h(
          "tr",
          {},
          h("td", {}, c.name),
          keys.map((k) => h("td", { class: "num" }, number(c.val[k]))),
          h("td", {}, h("a", { href: `#/chat?${new URLSearchParams({ run, checkpoint: c.name })}` }, "chat")),
        ),
      ),
    ),
  );
}

function episodeTable(lines) {
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, h("th", {}, "step"), h("th", {}, "episodes"))),
    h("tbody", {}, lines.map((l) => h("tr", {}, h("td", { class: "num" }, l.step), h("td", { class: "mono" }, (l.episodes || []).join(" "))))),
  );
}

export async function render(root, params) {
  const id = params.id;
  const title = h("h1", {}, id);
  const state = h("span");
  const progress = h("span", { class: "muted" });
  const charts = h("div", { class: "charts" });
  const checkpoints = h("div");
  const extra = h("div");
  const byGroup = new Map();
  let shownCheckpoints = -1;

  root.append(
    h("div", { class: "title" }, title, state, progress),
    h("p", {}, h("a", { href: `#/compare?${new URLSearchParams({ runs: id })}` }, "compare with other runs")),
    charts,
    h("h2", {}, "Checkpoints"),
    checkpoints,
    extra,
  );

  let maxSteps = null;
  let error = null;
  const showStep = (step) => {
    progress.textContent = ` step ${number(step)} of ${number(maxSteps)}${error ? ` — ${error}` : ""}`;
  };
  function showStatus(run) {
    state.replaceChildren(badge(run.state, run.error));
    [maxSteps, error] = [run.max_steps, run.error];
    showStep(run.step);
  }

  function addRecords(records) {
    const touched = new Set();
    let created = false;
    for (const record of records) {
      for (const [key, value] of Object.entries(record)) {
        if (NOT_PLOTTED.has(key) || typeof value !== "number") continue;
        const group = metricGroup(key);
        if (!byGroup.has(group)) {
          byGroup.set(group, new LineChart(charts, { title: group, group, color: splitColor }));
          created = true;
        }
        byGroup.get(group).add(key, record.step, value);
        touched.add(group);
      }
    }
    if (records.length) showStep(records.at(-1).step);
    if (created) charts.replaceChildren(...[...byGroup.keys()].sort(groupOrder).map((g) => byGroup.get(g).box));
    for (const group of touched) byGroup.get(group).draw();
  }

  async function loadDetail() {
    const detail = await getJSON(url("/api/run", { run: id }));
    showStatus(detail.run);
    shownCheckpoints = detail.run.checkpoints;
    checkpoints.replaceChildren(checkpointTable(id, detail.checkpoints));
    extra.replaceChildren(
      detail.plan ? h("div", {}, h("h2", {}, "Plan"), h("pre", {}, detail.plan)) : "",
      detail.episodes ? h("div", {}, h("h2", {}, "Episodes (newest steps)"), episodeTable(detail.episodes)) : "",
      h("h2", {}, "Config"),
      h("details", {}, h("summary", {}, "config.yaml"), h("pre", {}, detail.config ?? "(none)")),
    );
  }

  await loadDetail();
  const first = await getJSON(url("/api/run/metrics", { run: id }));
  addRecords(first.records);
  const stop = follow(url("/api/run/events", { run: id, offset: first.offset }), {
    metrics: (data) => addRecords(data.records),
    status: (run) => {
      showStatus(run);
      if (run.checkpoints !== shownCheckpoints) loadDetail().catch(() => {});
    },
  });
  return () => stop();
}
