// Polls /live.json every 2 s and draws the refusals of the last hour by rule.
"use strict";
(function () {
  const svgNS = "http://www.w3.org/2000/svg";
  function text(id, value) { document.getElementById(id).textContent = value; }
  function draw(hour) {
    const svg = document.getElementById("chart");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const rules = Object.keys(hour).sort((a, b) => hour[b] - hour[a]).slice(0, 10);
    const max = Math.max(1, ...rules.map((r) => hour[r]));
    svg.setAttribute("height", Math.max(30, 8 + rules.length * 21));
    rules.forEach((rule, i) => {
      const y = 4 + i * 21;
      const bar = document.createElementNS(svgNS, "rect");
      bar.setAttribute("x", 300); bar.setAttribute("y", y);
      bar.setAttribute("height", 16); bar.setAttribute("width", Math.max(1, 560 * hour[rule] / max));
      const label = document.createElementNS(svgNS, "text");
      label.setAttribute("x", 0); label.setAttribute("y", y + 12);
      label.textContent = rule + " (" + hour[rule] + ")";
      svg.appendChild(bar); svg.appendChild(label);
    });
  }
  function rows(selector, items, keys) {
    const body = document.querySelector(selector + " tbody");
    while (body.firstChild) body.removeChild(body.firstChild);
    for (const item of items) {
      const tr = document.createElement("tr");
      for (const k of keys) {
        const td = document.createElement("td");
        td.textContent = item[k] === null || item[k] === undefined ? "" : item[k];
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }
  async function poll() {
    try {
      const r = await fetch("/live.json", { credentials: "same-origin" });
      const data = await r.json();
      rows("#last", (data.last || []).map((e) => Object.assign({}, e, {
        why: (e.observed ? "observed: " : "") + (e.msg || e.reply || ""),
      })), ["ts", "client", "stage", "rule", "why"]);
      if (data.error) { text("live-error", data.error); return; }
      text("live-error", "");
      text("generation", data.generation);
      text("open", data.sessions_open);
      rows("#verdicts", data.verdicts, ["stage", "action", "rule", "mode", "count"]);
      draw(data.refusals_last_hour);
    } catch (e) { text("live-error", String(e)); }
  }
  poll();
  setInterval(poll, 2000);
})();
