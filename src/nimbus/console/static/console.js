// What every console page shares: nothing runs inline (the CSP forbids it), so pages only add data-*
// attributes and these handlers read them.
(function () {
  "use strict";
  // A plain form (or its button) with data-confirm asks before it is sent; htmx forms use hx-confirm.
  document.addEventListener("submit", function (event) {
    var button = event.submitter;
    var question = (button && button.dataset.confirm) || event.target.dataset.confirm;
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  }, true);
  // A request that failed on the network (the node restarting) says so instead of doing nothing.
  document.addEventListener("htmx:sendError", function () {
    var box = document.getElementById("messages");
    if (box) { box.textContent = "The node did not answer. Is it running?"; }
  });
  // A swap that succeeded clears an old error message.
  document.addEventListener("htmx:afterRequest", function (event) {
    var box = document.getElementById("messages");
    if (box && event.detail.successful && event.detail.target !== box) { box.textContent = ""; }
  });
})();
