// The invoke page: checks the event is JSON before it is sent (the node checks it again), and keeps the
// last few events sent to each function in this browser's localStorage, offered in the "Recent events"
// select. Nothing here is inline (the CSP forbids it); the page marks its parts with ids.
(function () {
  "use strict";
  var KEY = "nimbus.console.events";
  var KEEP = 5;
  var SAVED_MAX = 64 * 1024; // a bigger event is sent but not kept: localStorage holds a few MiB in all

  function $(id) { return document.getElementById(id); }

  function load() {
    try {
      var all = JSON.parse(window.localStorage.getItem(KEY) || "{}");
      return all && typeof all === "object" && !Array.isArray(all) ? all : {};
    } catch (e) {
      return {};
    }
  }

  function store(all) {
    try {
      window.localStorage.setItem(KEY, JSON.stringify(all));
    } catch (e) {
      // storage full or switched off: the page works without it
    }
  }

  function functionName() {
    var field = $("function");
    return field ? field.value.trim().split(":")[0] : "";
  }

  function eventsOf(name) {
    var found = load()[name];
    return Array.isArray(found) ? found.filter(function (e) { return typeof e === "string"; }) : [];
  }

  function remember(name, text) {
    if (!name || text.length > SAVED_MAX) { return; }
    var all = load();
    var kept = eventsOf(name).filter(function (e) { return e !== text; });
    kept.unshift(text);
    all[name] = kept.slice(0, KEEP);
    store(all);
  }

  function summary(text) {
    var line = text.replace(/\s+/g, " ").trim();
    return line.length > 70 ? line.slice(0, 69) + "…" : line;
  }

  function fill() {
    var select = $("recent");
    if (!select) { return; }
    var events = eventsOf(functionName());
    select.textContent = "";
    var first = document.createElement("option");
    first.value = "";
    first.textContent = events.length ? "Choose one of " + events.length + " saved events…" : "No saved events";
    select.appendChild(first);
    events.forEach(function (text, i) {
      var option = document.createElement("option");
      option.value = String(i);
      option.textContent = summary(text);
      select.appendChild(option);
    });
    select.disabled = events.length === 0;
  }

  function problem(message) {
    var box = $("event-problem");
    var area = $("event");
    if (!box || !area) { return; }
    box.textContent = message || "";
    box.hidden = !message;
    if (message) {
      area.setAttribute("aria-invalid", "true");
      area.setAttribute("aria-describedby", "event-help event-problem");
    } else {
      area.removeAttribute("aria-invalid");
      area.setAttribute("aria-describedby", "event-help");
    }
  }

  // The event as it will be sent, or null (with the reason shown) when it is not JSON or too large.
  function checked() {
    var area = $("event");
    var text = area.value;
    var max = parseInt(area.dataset.max || "0", 10);
    if (max && new Blob([text]).size > max) {
      problem("The event is larger than " + Math.round(max / 1048576) + " MiB, the limit.");
      return null;
    }
    if (text.trim()) {
      try {
        JSON.parse(text);
      } catch (e) {
        problem("The event is not valid JSON: " + e.message);
        return null;
      }
    }
    problem("");
    return text.trim() || "{}";
  }

  document.addEventListener("htmx:beforeRequest", function (event) {
    if (!event.detail.elt || event.detail.elt.id !== "invoke-form") { return; }
    var text = checked();
    if (text === null) {
      event.preventDefault();
      $("event").focus();
      return;
    }
    remember(functionName(), text);
    fill();
  });

  document.addEventListener("change", function (event) {
    var target = event.target;
    if (target.id === "function") {
      fill();
    } else if (target.id === "recent" && target.value !== "") {
      var text = eventsOf(functionName())[parseInt(target.value, 10)];
      if (typeof text === "string") {
        $("event").value = text;
        problem("");
      }
    }
  });

  document.addEventListener("click", function (event) {
    if (event.target.id !== "format-event") { return; }
    var area = $("event");
    if (checked() !== null && area.value.trim()) {
      area.value = JSON.stringify(JSON.parse(area.value), null, 2);
    }
  });

  fill();
})();
