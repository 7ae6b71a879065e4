// Keyboard navigation, the organ/landmark layers and grading by digits.
// Plain JavaScript, no dependencies and no build step.
(function () {
  "use strict";
  var typing = function (e) {
    var t = e.target;
    return t && (t.tagName === "TEXTAREA" || t.isContentEditable ||
      (t.tagName === "INPUT" && !/^(radio|checkbox)$/.test(t.type)) || t.tagName === "SELECT");
  };
  var go = function (id) { var a = document.getElementById(id); if (a) { window.location.href = a.href; } };

  // --- gallery: j/k or arrows move between cards, Enter opens, n/p change page ---
  function gallery(list) {
    var links = Array.prototype.slice.call(list.querySelectorAll("a[data-id]"));
    var at = -1;
    var move = function (step) {
      if (!links.length) { return; }
      at = Math.max(0, Math.min(links.length - 1, at + step));
      links[at].focus();
    };
    document.addEventListener("keydown", function (e) {
      if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) { return; }
      if (e.key === "j" || e.key === "ArrowRight" || e.key === "ArrowDown") { move(1); e.preventDefault(); }
      else if (e.key === "k" || e.key === "ArrowLeft" || e.key === "ArrowUp") { move(-1); e.preventDefault(); }
      else if (e.key === "n") { go("next-page"); }
      else if (e.key === "p") { go("prev-page"); }
    });
    links.forEach(function (a, i) { a.addEventListener("focus", function () { at = i; }); });
  }

  // --- image page: outlines from the landmarks, switchable layers ---
  var SVG = "http://www.w3.org/2000/svg";
  var COLOURS = { RL: "#00e5ff", LL: "#ffd400", H: "#ff4fd8" };
  function layers(stage, svg, organs, other) {
    var fills = stage.getAttribute("data-fills") === "1";
    Object.keys(organs).forEach(function (code) {
      var g = document.createElementNS(SVG, "g");
      g.setAttribute("data-layer", code);
      var poly = document.createElementNS(SVG, "polygon");
      poly.setAttribute("points", organs[code].map(function (p) { return p[0] + "," + p[1]; }).join(" "));
      // Over the plain picture the organ is filled too, so switching it off shows the bare X-ray.
      poly.setAttribute("fill", fills ? COLOURS[code] : "none");
      poly.setAttribute("fill-opacity", fills ? "0.3" : "0");
      poly.setAttribute("stroke", COLOURS[code]);
      poly.setAttribute("stroke-width", "3");
      g.appendChild(poly);
      svg.appendChild(g);
    });
    var dots = document.createElementNS(SVG, "g");
    dots.setAttribute("data-layer", "points");
    dots.style.display = "none";
    Object.keys(organs).forEach(function (code) {
      organs[code].forEach(function (p) {
        var c = document.createElementNS(SVG, "circle");
        c.setAttribute("cx", p[0]); c.setAttribute("cy", p[1]); c.setAttribute("r", "5");
        c.setAttribute("fill", COLOURS[code]); c.setAttribute("stroke", "#000");
        dots.appendChild(c);
      });
    });
    svg.appendChild(dots);
    if (other) {
      // The compared model's organs: dashed outlines only, over ours.
      var theirs = document.createElementNS(SVG, "g");
      theirs.setAttribute("data-layer", "other");
      Object.keys(other).forEach(function (code) {
        var line = document.createElementNS(SVG, "polygon");
        line.setAttribute("points", other[code].map(function (p) { return p[0] + "," + p[1]; }).join(" "));
        line.setAttribute("fill", "none");
        line.setAttribute("stroke", "#ffffff");
        line.setAttribute("stroke-width", "3");
        line.setAttribute("stroke-dasharray", "12 8");
        theirs.appendChild(line);
      });
      svg.appendChild(theirs);
    }
    var show = function (name, on) {
      if (name === "picture") { stage.classList.toggle("hide-picture", !on); return; }
      var g = svg.querySelector('[data-layer="' + name + '"]');
      if (g) { g.style.display = on ? "" : "none"; }
    };
    var boxes = document.querySelectorAll("input[data-layer]");
    Array.prototype.forEach.call(boxes, function (box) {
      box.addEventListener("change", function () { show(box.getAttribute("data-layer"), box.checked); });
    });
    return function (name) {
      var box = document.querySelector('input[data-layer="' + name + '"]');
      if (box) { box.checked = !box.checked; show(name, box.checked); }
    };
  }

  // --- grading: digits fill overall, right lung, left lung, heart in turn ---
  function grading(form) {
    var sets = Array.prototype.slice.call(form.querySelectorAll("fieldset[data-grade]"));
    var at = 0;
    var mark = function () { sets.forEach(function (s, i) { s.classList.toggle("active", i === at); }); };
    sets.forEach(function (s, i) {
      s.addEventListener("change", function () { at = Math.min(i + 1, sets.length - 1); mark(); });
    });
    mark();
    var reviewer = form.querySelector("#reviewer");
    return function (e) {
      if (/^[1-5]$/.test(e.key)) {
        var input = sets[at].querySelector('input[value="' + e.key + '"]');
        input.checked = true;
        at = Math.min(at + 1, sets.length - 1);
        mark();
        return true;
      }
      if (e.key === "Backspace") {
        at = Math.max(at - 1, 0);
        Array.prototype.forEach.call(sets[at].querySelectorAll("input"), function (r) { r.checked = false; });
        mark();
        return true;
      }
      if (e.key === "Enter") {
        if (!reviewer.value.trim()) { reviewer.focus(); return true; }
        if (form.reportValidity()) { form.submit(); }
        return true;
      }
      return false;
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    var list = document.getElementById("gallery");
    if (list) { gallery(list); }
    var data = document.getElementById("organs");
    if (!data) { return; }
    var theirs = document.getElementById("other-organs");
    var toggle = layers(document.getElementById("stage"), document.getElementById("layers"), JSON.parse(data.textContent),
      theirs ? JSON.parse(theirs.textContent) : null);
    var form = document.getElementById("grade");
    var grade = form ? grading(form) : function () { return false; };
    var keys = { o: "picture", r: "RL", l: "LL", h: "H", m: "points", c: "other" };
    document.addEventListener("keydown", function (e) {
      if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) { return; }
      if (grade(e)) { e.preventDefault(); return; }
      if (keys[e.key]) { toggle(keys[e.key]); }
      else if (e.key === "j" || e.key === "ArrowRight") { go("next"); }
      else if (e.key === "k" || e.key === "ArrowLeft") { go("prev"); }
    });
  });
})();
