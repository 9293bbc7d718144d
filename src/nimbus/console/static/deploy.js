// The deploy page: shows only the code input its "where the code comes from" choice needs, swaps the
// runtime's starter and default handler in while the user has not edited them, and sends a folder's files
// under their paths relative to it (FormData alone would send bare file names). Nothing inline (CSP).
(function () {
  "use strict";
  function $(id) { return document.getElementById(id); }

  function chosenSource() {
    var checked = document.querySelector("#deploy-form input[name=source]:checked");
    return checked ? checked.value : "paste";
  }

  function showSource() {
    var source = chosenSource();
    document.querySelectorAll("#deploy-form [data-part]").forEach(function (part) {
      part.hidden = part.dataset.part !== source;
    });
  }

  function optionOf(runtime) {
    var select = $("runtime");
    for (var i = 0; i < select.options.length; i++) {
      if (select.options[i].value === runtime) { return select.options[i]; }
    }
    return null;
  }

  var runtime = $("runtime");
  var previous = runtime ? runtime.value : "";

  function swapRuntime() {
    var before = optionOf(previous);
    var after = optionOf(runtime.value);
    previous = runtime.value;
    if (!after) { return; }
    var code = $("code");
    var handler = $("handler");
    // Untouched: still what the last runtime offered (or empty). Edited code is never replaced.
    if (code && (!code.value.trim() || (before && code.value === before.dataset.starter))) {
      code.value = after.dataset.starter || "";
    }
    if (handler && (!handler.value.trim() || (before && handler.value === before.dataset.handler))) {
      handler.value = after.dataset.handler || "";
    }
  }

  document.addEventListener("change", function (event) {
    if (event.target.name === "source") { showSource(); }
    if (event.target.id === "runtime") { swapRuntime(); }
  });

  // A folder's files keep their relative paths (folder/sub/file.py): the node zips them as a package.
  document.addEventListener("htmx:configRequest", function (event) {
    if (!event.detail.elt || event.detail.elt.id !== "deploy-form") { return; }
    var data = event.detail.formData;
    var folder = $("folder");
    if (!data || !folder) { return; }
    data.delete("folder");
    if (chosenSource() === "folder") {
      Array.prototype.forEach.call(folder.files, function (file) {
        data.append("folder", file, file.webkitRelativePath || file.name);
      });
    }
    if (chosenSource() !== "file") { data.delete("file"); }
    if (chosenSource() !== "paste") { data.delete("code"); }
  });

  if ($("deploy-form")) { showSource(); }
})();
