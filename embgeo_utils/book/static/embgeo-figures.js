/* The book's interactive figures (embgeo_utils.chapters.interactive), drawn with the site's own copy of plotly.js.
 *
 * Each figure is a <div class="embgeo-plotly"> holding its plotly specification as JSON. Once a figure is drawn,
 * the static image of the same figure (the output just before it) is marked "embgeo-static": the page's stylesheet
 * hides it on screen and shows it in print. Without plotly.js (or JavaScript) the static image stays.
 */
(function () {
  "use strict";

  var CONFIG = {
    responsive: true,
    displaylogo: false,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "toImage"],
  };

  function staticImage(holder) {
    var output = holder.closest(".output") || holder.parentElement;
    var previous = output ? output.previousElementSibling : null;
    if (!previous) return null;
    if (previous.tagName === "IMG") return previous;
    return previous.querySelector ? previous.querySelector("img") : null;
  }

  function draw(holder) {
    if (holder.dataset.drawn) return;
    var source = holder.querySelector('script[type="application/json"]');
    if (!source || !window.Plotly) return;
    var spec = JSON.parse(source.textContent);
    var graph = document.createElement("div");
    graph.className = "embgeo-plotly-graph";
    holder.appendChild(graph);
    holder.dataset.drawn = "1";
    window.Plotly.newPlot(graph, spec.data, spec.layout, CONFIG).then(function () {
      var image = staticImage(holder);
      if (image) image.classList.add("embgeo-static");
      holder.classList.add("embgeo-drawn");
    });
  }

  function drawAll() {
    document.querySelectorAll(".embgeo-plotly").forEach(draw);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", drawAll);
  } else {
    drawAll();
  }
})();
