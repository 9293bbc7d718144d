// The console's charts: uPlot draws every element carrying data-chart (JSON: {unit, points, x: [unix
// seconds], series: [{label, values}]}). The CSP allows no inline script, so pages ship only data; this file draws
// it on load and again whenever htmx swaps new figures in (the overview refreshes every 10 s).
(function () {
  "use strict";
  var COLORS = ["#1f5fbf", "#b42318", "#1a7f37", "#9a6700"];
  var HEIGHT = 220;
  var plots = [];

  function number(value, unit) {
    if (value === null || value === undefined) { return "–"; }
    var text = value >= 100 || value === Math.round(value) ? Math.round(value).toLocaleString() : value.toFixed(2);
    return unit === "ms" ? text + " ms" : text;
  }

  function width(el) {
    return Math.max(240, el.clientWidth || 0);
  }

  function options(spec, el) {
    var series = [{}];
    spec.series.forEach(function (one, i) {
      series.push({
        label: one.label,
        stroke: COLORS[i % COLORS.length],
        width: 2,
        points: spec.points ? { show: true, size: 6 } : { size: 4 },
        value: function (u, v) { return number(v, spec.unit); }
      });
    });
    return {
      width: width(el),
      height: HEIGHT,
      series: series,
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; } } },
      axes: [{}, { label: spec.unit, size: 64, values: function (u, ticks) {
        return ticks.map(function (t) { return number(t, ""); });
      } }],
      cursor: { drag: { x: false, y: false } }
    };
  }

  function prune() {
    plots = plots.filter(function (plot) {
      if (document.body.contains(plot.root)) { return true; }
      plot.destroy();
      return false;
    });
  }

  function draw(root) {
    if (typeof uPlot === "undefined" || !root || !root.querySelectorAll) { return; }
    prune();
    var found = Array.prototype.slice.call(root.querySelectorAll("[data-chart]"));
    if (root.matches && root.matches("[data-chart]")) { found.push(root); }
    found.forEach(function (el) {
      if (el.dataset.drawn) { return; }
      var spec;
      try { spec = JSON.parse(el.dataset.chart); } catch (e) { return; }
      var data = [spec.x].concat(spec.series.map(function (one) { return one.values; }));
      el.dataset.drawn = "1";
      plots.push({ root: el, plot: new uPlot(options(spec, el), data, el), destroy: function () { this.plot.destroy(); } });
    });
  }

  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(function () {
      prune();
      plots.forEach(function (one) { one.plot.setSize({ width: width(one.root), height: HEIGHT }); });
    }, 150);
  });

  if (window.htmx) {
    window.htmx.onLoad(draw);  // the first load too: htmx fires it for the body when it starts
  } else {
    document.addEventListener("DOMContentLoaded", function () { draw(document.body); });
  }
})();
