// A small canvas line chart: several named series on shared axes, drawn again when points
// arrive or the size changes. `canvas.dataset.points` counts the points drawn.

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];
const PAD = { left: 58, right: 12, top: 26, bottom: 34 };

// Round tick values covering [lo, hi].
export function ticks(lo, hi, count = 5) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const scaled = raw / magnitude;
  const step = (scaled >= 7.5 ? 10 : scaled >= 3.5 ? 5 : scaled >= 1.5 ? 2 : 1) * magnitude;
  const out = [];
  for (let value = Math.ceil(lo / step) * step; value <= hi + step * 1e-9; value += step) {
    out.push(Math.abs(value) < step * 1e-9 ? 0 : value);
  }
  return out;
}

function label(value) {
  const size = Math.abs(value);
  if (size !== 0 && (size >= 1e5 || size < 1e-3)) return value.toExponential(1);
  return String(Number(value.toPrecision(4)));
}

export class LineChart {
  // color(name, index): a series' color (default: by the order series arrive).
  constructor(container, { title, xLabel = "step", group = title, height = 230, color } = {}) {
    this.title = title;
    this.color = color || ((name, index) => COLORS[index % COLORS.length]);
    this.xLabel = xLabel;
    this.series = new Map(); // name -> {points: [[x, y]], color}
    this.box = document.createElement("div");
    this.box.className = "chart";
    this.canvas = document.createElement("canvas");
    this.canvas.style.height = `${height}px`;
    this.canvas.dataset.group = group;
    this.canvas.dataset.points = "0";
    this.tip = document.createElement("div");
    this.tip.className = "chart-tip";
    this.box.append(this.canvas, this.tip);
    container.append(this.box);
    this.canvas.addEventListener("mousemove", (event) => this.hover(event));
    this.canvas.addEventListener("mouseleave", () => (this.tip.style.display = "none"));
    this.resize = new ResizeObserver(() => this.draw());
    this.resize.observe(this.canvas);
  }

  add(name, x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y)) return;
    if (!this.series.has(name)) {
      this.series.set(name, { points: [], color: this.color(name, this.series.size) });
    }
    this.series.get(name).points.push([x, y]);
  }

  set(name, points) {
    this.series.delete(name);
    for (const [x, y] of points) this.add(name, x, y);
  }

  clear() {
    this.series.clear();
  }

  destroy() {
    this.resize.disconnect();
    this.box.remove();
  }

  bounds() {
    let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
    for (const { points } of this.series.values()) {
      for (const [x, y] of points) {
        x0 = Math.min(x0, x);
        x1 = Math.max(x1, x);
        y0 = Math.min(y0, y);
        y1 = Math.max(y1, y);
      }
    }
    if (!Number.isFinite(x0)) return null;
    if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
    const margin = (y1 - y0) * 0.06 || Math.abs(y1) * 0.1 || 1;
    return { x0, x1, y0: y0 - margin, y1: y1 + margin };
  }

  draw() {
    const { canvas } = this;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    g.font = "12px system-ui, sans-serif";
    g.fillStyle = "#111827";
    g.fillText(this.title, PAD.left, 16);
    const total = [...this.series.values()].reduce((n, s) => n + s.points.length, 0);
    canvas.dataset.points = String(total);
    const b = this.bounds();
    this.frame = b && { ...b, width, height };
    if (!b) {
      g.fillStyle = "#6b7280";
      g.fillText("no points yet", PAD.left, height / 2);
      return;
    }
    const sx = (x) => PAD.left + ((x - b.x0) / (b.x1 - b.x0)) * (width - PAD.left - PAD.right);
    const sy = (y) => height - PAD.bottom - ((y - b.y0) / (b.y1 - b.y0)) * (height - PAD.top - PAD.bottom);
    g.strokeStyle = "#e5e7eb";
    g.fillStyle = "#6b7280";
    g.lineWidth = 1;
    g.textAlign = "right";
    for (const y of ticks(b.y0, b.y1)) {
      g.beginPath();
      g.moveTo(PAD.left, sy(y));
      g.lineTo(width - PAD.right, sy(y));
      g.stroke();
      g.fillText(label(y), PAD.left - 6, sy(y) + 4);
    }
    g.textAlign = "center";
    for (const x of ticks(b.x0, b.x1, Math.max(2, Math.floor(width / 90)))) {
      g.fillText(label(x), sx(x), height - PAD.bottom + 16);
    }
    g.fillText(this.xLabel, (PAD.left + width - PAD.right) / 2, height - 4);
    g.textAlign = "left";
    let legendX = PAD.left + g.measureText(this.title).width + 16;
    for (const [name, { points, color }] of this.series) {
      g.strokeStyle = color;
      g.fillStyle = color;
      g.lineWidth = 1.6;
      g.beginPath();
      points.forEach(([x, y], i) => (i ? g.lineTo(sx(x), sy(y)) : g.moveTo(sx(x), sy(y))));
      g.stroke();
      if (points.length < 40) {
        for (const [x, y] of points) g.fillRect(sx(x) - 2, sy(y) - 2, 4, 4);
      }
      g.fillRect(legendX, 8, 10, 10);
      g.fillStyle = "#374151";
      g.fillText(name, legendX + 14, 17);
      legendX += g.measureText(name).width + 30;
    }
  }

  // The values of every series at the step nearest the pointer.
  hover(event) {
    const f = this.frame;
    if (!f) return;
    const rect = this.canvas.getBoundingClientRect();
    const x = f.x0 + ((event.clientX - rect.left - PAD.left) / (f.width - PAD.left - PAD.right)) * (f.x1 - f.x0);
    const lines = [];
    for (const [name, { points }] of this.series) {
      let best = null;
      for (const point of points) {
        if (!best || Math.abs(point[0] - x) < Math.abs(best[0] - x)) best = point;
      }
      if (best) lines.push(`${name} @ ${label(best[0])}: ${label(best[1])}`);
    }
    this.tip.textContent = lines.join("\n");
    this.tip.style.display = lines.length ? "block" : "none";
    this.tip.style.left = `${Math.min(event.clientX - rect.left + 12, f.width - 180)}px`;
    this.tip.style.top = `${event.clientY - rect.top + 12}px`;
  }
}

// The chart a metric belongs to: its name without the split (train/loss and val/loss: loss).
export function metricGroup(key) {
  const parts = key.split("/");
  if (parts.length > 1 && (parts[0] === "train" || parts[0] === "val" || parts[0].endsWith("_val"))) {
    return parts.slice(1).join("/");
  }
  return key;
}

// Training metrics in one color, held-out ones in another, whatever comes first.
export function splitColor(name) {
  const split = name.split("/")[0];
  return COLORS[split === "val" ? 1 : split.endsWith("_val") ? 2 : 0];
}

export const NOT_PLOTTED = new Set(["step", "time", "train/tokens"]);
const FIRST = ["loss", "accuracy", "perplexity", "lr", "grad_norm", "tokens_per_sec", "mfu_percent"];

export function groupOrder(a, b) {
  const rank = (g) => (FIRST.includes(g) ? FIRST.indexOf(g) : FIRST.length);
  return rank(a) - rank(b) || a.localeCompare(b);
}
