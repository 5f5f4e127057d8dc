// pgq dashboard: draws the throughput chart (uPlot) from the JSON the overview carries, and redraws it
// when htmx refreshes the overview. No inline scripts anywhere: the Content-Security-Policy forbids them.
(function () {
  "use strict";
  var chart = null;

  function readData() {
    var el = document.getElementById("throughput-data");
    if (!el) { return null; }
    var d = JSON.parse(el.textContent);
    return [d.x, d.succeeded, d.failed, d.cancelled];
  }

  function width(el) { return Math.max(320, el.clientWidth || 800); }

  function draw() {
    var el = document.getElementById("throughput-chart");
    var data = readData();
    if (!el || !data || typeof uPlot === "undefined") { return; }
    if (chart) { chart.setData(data); return; }
    chart = new uPlot({
      width: width(el),
      height: 220,
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(5, max)]; } } },
      series: [
        {},
        { label: "succeeded", stroke: "#1f8a4c", fill: "rgba(31,138,76,0.08)", width: 2 },
        { label: "failed", stroke: "#c4352b", width: 2 },
        { label: "cancelled", stroke: "#7b8794", width: 1, dash: [4, 4] }
      ],
      axes: [{}, { label: "jobs / minute", size: 60 }]
    }, data, el);
    el.setAttribute("data-ready", "1");
    window.addEventListener("resize", function () { chart.setSize({ width: width(el), height: 220 }); });
  }

  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:afterSettle", draw);
})();
