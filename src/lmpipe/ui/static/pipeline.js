// A pipeline's report card: report.md (its table and curve PNGs) and the stages' runs.
import { getJSON, url } from "./api.js";
import { h, runLink } from "./dom.js";

function cells(line) {
  return line.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
}

// The Markdown the report uses: headings, tables, images and paragraphs.
export function markdown(text, image) {
  const out = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const heading = line.match(/^(#{1,3})\s+(.*)$/);
    const picture = line.match(/^!\[([^\]]*)\]\(([^)]+)\)$/);
    if (heading) out.push(h(`h${heading[1].length + 1}`, {}, heading[2]));
    else if (picture) out.push(h("img", { alt: picture[1], src: image(picture[2]) }));
    else if (line.startsWith("|")) {
      const rows = [];
      while (i < lines.length && lines[i].startsWith("|")) rows.push(cells(lines[i++]));
      i--;
      const body = rows.slice(1).filter((r) => !r.every((c) => /^:?-+:?$/.test(c)));
      out.push(
        h("table", {}, h("thead", {}, h("tr", {}, rows[0].map((c) => h("th", {}, c)))), h("tbody", {}, body.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))))),
      );
    } else if (line.trim()) out.push(h("p", {}, line));
  }
  return out;
}

export async function render(root, params) {
  const data = await getJSON(url("/api/pipeline", { pipeline: params.id }));
  const image = (name) => url("/api/pipeline/image", { pipeline: data.id, name });
  root.append(
    h("h1", {}, `Pipeline ${data.id}`),
    h("p", {}, "stages: ", ...data.stages.flatMap((id, i) => [i ? ", " : "", runLink(id)])),
    h("div", { class: "report" }, data.report_md ? markdown(data.report_md, image) : h("p", { class: "muted" }, "no report yet: the pipeline writes it when its last stage is done")),
  );
  const shown = new Set((data.report_md || "").match(/[\w.-]+\.png/g) || []);
  const more = data.images.filter((name) => !shown.has(name));
  if (more.length) root.append(h("h2", {}, "Images"), ...more.map((name) => h("img", { alt: name, src: image(name) })));
  if (data.state) root.append(h("h2", {}, "pipeline_state.json"), h("pre", {}, JSON.stringify(data.state, null, 2)));
}
