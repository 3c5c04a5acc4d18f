// Enhancements only: every page works without this script.
(function () {
  "use strict";

  // A copy button beside each command and digest block.
  function copy(text, button) {
    var done = function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done);
      return;
    }
    var area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); done(); } finally { document.body.removeChild(area); }
  }
  document.querySelectorAll("pre").forEach(function (pre) {
    var b = document.createElement("button");
    b.type = "button";
    b.className = "copy";
    b.textContent = "Copy";
    b.addEventListener("click", function () { copy(pre.textContent, b); });
    pre.parentNode.insertBefore(b, pre);
  });

  // Search as you type: the results page replaces the main content.
  var input = document.querySelector(".search input[name=q]");
  var main = document.querySelector("main");
  if (!input || !main || !window.fetch || !window.DOMParser) { return; }
  var timer = null;
  var asked = 0;
  input.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(function () {
      var q = input.value.trim();
      var url = "/ui/" + (q ? "?q=" + encodeURIComponent(q) : "");
      var n = ++asked;
      fetch(url, { credentials: "same-origin" }).then(function (r) { return r.text(); }).then(function (html) {
        if (n !== asked) { return; }
        var page = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        if (page) {
          main.innerHTML = page.innerHTML;
          history.replaceState(null, "", url);
        }
      });
    }, 250);
  });
})();
