// DOM and formatting helpers. Text from runs and models is always set as text, never HTML.

export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function number(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  const size = Math.abs(value);
  if (size !== 0 && (size >= 1e5 || size < 1e-3)) return value.toExponential(2);
  return value.toPrecision(digits).replace(/\.?0+$/, "");
}

export function clock(seconds) {
  if (!seconds) return "–";
  const date = new Date(seconds * 1000);
  return date.toLocaleString("en-GB", { dateStyle: "short", timeStyle: "medium" });
}

export function ago(seconds) {
  if (!seconds) return "–";
  const delta = Math.max(0, Date.now() / 1000 - seconds);
  if (delta < 60) return `${Math.round(delta)} s ago`;
  if (delta < 3600) return `${Math.round(delta / 60)} min ago`;
  if (delta < 86400) return `${(delta / 3600).toFixed(1)} h ago`;
  return `${(delta / 86400).toFixed(1)} d ago`;
}

export function badge(state, why) {
  return h("span", { class: `badge ${state}`, title: why || state, dataset: { state } }, state);
}

export function runLink(id, text = id) {
  return h("a", { href: `#/run?${new URLSearchParams({ id })}` }, text);
}
