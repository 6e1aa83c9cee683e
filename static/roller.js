/* roller dashboard: confirmations, live updates and times.  No framework;
 * every page works without it (destructive tasks then get a confirmation
 * page, times stay in UTC, the fleet page is reloaded by hand).  Text from
 * the server's JSON is only ever set with textContent; the fleet page's live
 * parts are copied from the page itself fetched again (DOMParser over
 * roller's own autoescaped HTML, never text spliced into markup). */
(function () {
  "use strict";

  // -- confirm destructive actions before the form is sent
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var button = ev.submitter || null;
    // forms acting on a selection (the fleet's batch form, the queue's "Cancel selected") need one
    var needs = form.getAttribute("data-needs");
    if (needs && !checkedIn(form, needs.split(" ")).length) {
      ev.preventDefault();
      setText(form.getAttribute("data-needs-status") || "", form.getAttribute("data-needs-message") || "Select something first.");
      return;
    }
    var message = (button && button.getAttribute("data-confirm")) || form.getAttribute("data-confirm");
    var confirmField = form.querySelector("input[name=confirm]");
    if (confirmField) { confirmField.value = ""; }
    if (!message) { return; }
    if (!window.confirm(message)) { ev.preventDefault(); return; }
    if (confirmField) { confirmField.value = "yes"; }
  });

  var FINAL = ["succeeded", "failed", "cancelled", "timed_out", "interrupted"];

  /* The checked checkboxes of a form (those outside it with form="id" too) named one of names. */
  function checkedIn(form, names) {
    return Array.prototype.filter.call(form.elements, function (el) {
      return el.type === "checkbox" && el.checked && !el.disabled && names.indexOf(el.name) >= 0;
    });
  }

  function outcomeText(job) {
    switch (job.state) {
      case "queued": return "Waiting in the queue: it starts when the machine and its power/BMC endpoints are free.";
      case "running": return "Running now; the log below updates live.";
      case "succeeded": return job.result ? "Succeeded: " + job.result : "Succeeded.";
      case "failed": return job.error ? "Failed: " + job.error : "Failed, without a reason recorded.";
      case "timed_out": return "Gave up: the job " + (job.error || "timed out") + ", and was stopped.";
      case "cancelled": return job.error ? "Cancelled (" + job.error + ")." : "Cancelled.";
      case "interrupted": return "Interrupted: roller stopped while this job was running, so its outcome is unknown.";
      default: return job.state;
    }
  }

  function setText(id, text) {
    var el = document.getElementById(id);
    if (el) { el.textContent = text; }
  }

  // -- times: <time datetime="ISO-8601 UTC"> from the server (UTC text) shown in the browser's time zone, one
  // format per page, with UTC in the tooltip; relative ones (data-relative: "5 min ago") tick.  Also for
  // <time> elements added later (live updates).
  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function localText(d, format) {
    var date = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate());
    var hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
    if (format === "date") { return date; }
    if (format === "time") { return hm + ":" + pad(d.getSeconds()); }
    return date + " " + hm;
  }

  function utcText(d) { return d.toISOString().slice(0, 19).replace("T", " ") + " UTC"; }

  function agoText(d, now) {
    var delta = (now - d.getTime()) / 1000, future = delta < 0, text;
    delta = Math.abs(delta);
    if (delta < 1) { return "just now"; }
    if (delta < 90) { text = Math.round(delta) + " s"; }
    else if (delta < 90 * 60) { text = Math.round(delta / 60) + " min"; }
    else if (delta < 36 * 3600) { text = Math.round(delta / 3600) + " h"; }
    else { text = Math.round(delta / 86400) + " days"; }
    return future ? "in " + text : text + " ago";
  }

  function showTime(el, now) {
    var d = new Date(el.getAttribute("datetime"));
    if (isNaN(d.getTime())) { return; }
    if (el.hasAttribute("data-relative")) {
      el.textContent = agoText(d, now);
      el.title = localText(d, "datetime") + " (local) · " + utcText(d);
    } else {
      el.textContent = localText(d, el.getAttribute("data-format") || "datetime");
      el.title = utcText(d);
    }
    el.setAttribute("data-shown", "1");
  }

  function showTimes(root, all) {
    var now = Date.now();
    var found = root.querySelectorAll ? root.querySelectorAll(all ? "time[datetime]" : "time[datetime]:not([data-shown])") : [];
    Array.prototype.forEach.call(found, function (el) { showTime(el, now); });
    if (root.matches && root.matches("time[datetime]")) { showTime(root, now); }
  }

  showTimes(document, true);
  var zone = "";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { zone = ""; }
  var zoneNote = document.getElementById("tz-note");
  if (zoneNote) {
    zoneNote.textContent = "times are in your time zone" + (zone ? " (" + zone + ")" : "") + "; hover for UTC";
  }
  window.setInterval(function () {
    var now = Date.now();
    Array.prototype.forEach.call(document.querySelectorAll("time[datetime][data-relative]"),
      function (el) { showTime(el, now); });
  }, 10000);
  if (window.MutationObserver) {
    new MutationObserver(function (records) {
      records.forEach(function (r) {
        Array.prototype.forEach.call(r.addedNodes, function (n) { if (n.nodeType === 1) { showTimes(n, false); } });
      });
    }).observe(document.body, { childList: true, subtree: true });
  }

  /* A <time> for an ISO time (live updates), shown like the server's: relative, or absolute. */
  function setTime(id, iso, relative) {
    var el = document.getElementById(id);
    if (!el) { return; }
    var time = document.createElement("time");
    time.setAttribute("datetime", iso);
    if (relative) { time.setAttribute("data-relative", ""); }
    time.textContent = iso.slice(0, 19).replace("T", " ") + " UTC";
    showTime(time, Date.now());
    el.replaceChildren(time);
  }

  // -- a table wider than the screen scrolls inside its wrapper: make that region reachable by keyboard
  function scrollableTables() {
    Array.prototype.forEach.call(document.querySelectorAll(".table-wrap"), function (wrap, i) {
      var scrolls = wrap.scrollWidth > wrap.clientWidth + 1;
      if (scrolls && !wrap.hasAttribute("tabindex")) {
        var section = wrap.closest("section"), heading = section && section.querySelector("h2, h1");
        wrap.setAttribute("tabindex", "0");
        wrap.setAttribute("role", "region");
        wrap.setAttribute("aria-label", (heading ? heading.textContent.trim() : "Table " + (i + 1)) + " (scrolls sideways)");
        wrap.setAttribute("data-scroll-region", "1");
      } else if (!scrolls && wrap.hasAttribute("data-scroll-region")) {
        ["tabindex", "role", "aria-label", "data-scroll-region"].forEach(function (a) { wrap.removeAttribute(a); });
      }
    });
  }
  scrollableTables();
  window.addEventListener("resize", scrollableTables);

  // -- "/" focuses the page's search field (the fleet's), unless typing somewhere already
  document.addEventListener("keydown", function (ev) {
    if (ev.key !== "/" || ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var t = ev.target, tag = t && t.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || (t && t.isContentEditable)) { return; }
    var search = document.querySelector("input[type=search][aria-keyshortcuts='/']");
    if (search) {
      ev.preventDefault();
      var box = search.closest("details");
      if (box) { box.open = true; }
      search.focus();
      search.select();
    }
  });

  // -- the fleet's filters fold away on a phone, unless some are set
  var filterBox = document.getElementById("filter-box");
  if (filterBox && !filterBox.hasAttribute("data-active") && window.matchMedia &&
      window.matchMedia("(max-width: 40rem)").matches) {
    filterBox.open = false;
  }

  // -- the job page: append events as they happen
  var timeline = document.getElementById("timeline");
  if (timeline && timeline.dataset.stream && window.EventSource) {
    var source = new EventSource(timeline.dataset.stream);
    source.onopen = function () { setText("live-status", "Live: new lines appear as they happen."); };
    source.onerror = function () {
      if (source.readyState !== EventSource.CLOSED) { setText("live-status", "Connection lost; reconnecting…"); }
    };
    source.addEventListener("reset", function () {
      setText("live-status", "Some updates were missed; reloading the page…");
      source.close();
      window.location.reload();
    });
    source.onmessage = function (message) {
      var data;
      try { data = JSON.parse(message.data); } catch (e) { return; }
      var event = data.event, job = data.job;
      if (!event || !job || job.task_id !== timeline.dataset.job) { return; }
      var empty = document.getElementById("timeline-empty");
      if (empty) { empty.remove(); }
      var item = document.createElement("li");
      item.className = "ev ev-" + (event.kind === "state" ? "state" : "log");
      var time = document.createElement("time");
      time.setAttribute("datetime", event.time || "");
      time.setAttribute("data-format", "time");
      time.textContent = (event.time || "").slice(11, 19);
      var text = document.createElement("span");
      text.className = "msg";
      text.textContent = event.message;
      item.appendChild(time);
      item.appendChild(document.createTextNode(" "));
      item.appendChild(text);
      timeline.appendChild(item);
      if (event.kind === "state") {
        var badge = document.querySelector("#job-state .state");
        if (badge) {
          badge.className = "state state-" + job.state;
          badge.textContent = job.state.replace("_", " ");
        }
        var outcome = document.getElementById("job-outcome");
        if (outcome) {
          outcome.className = "outcome outcome-" + job.state;
          outcome.textContent = outcomeText(job);
        }
        document.title = document.title.replace(/\([a-z_]+\)/, "(" + job.state + ")");
        if (job.started) { setTime("job-started", job.started, true); }
        if (job.finished) { setTime("job-finished", job.finished, true); }
        if (FINAL.indexOf(job.state) >= 0) {
          var cancel = document.getElementById("job-cancel");
          if (cancel) { cancel.remove(); }
          source.close();
          setText("live-status", "Finished: " + job.state.replace("_", " ") + ".");
        }
      }
    };
  }

  // -- the fleet page: select machines (a page, or every machine matching the filter) for a batch
  var batchForm = document.getElementById("batch-form");
  if (batchForm) {
    var pickPage = document.getElementById("pick-page");
    var allMatching = document.getElementById("all-matching");
    var rowBoxes = function () {
      return Array.prototype.filter.call(batchForm.elements, function (el) { return el.name === "m"; });
    };
    var countPicks = function () {
      var boxes = rowBoxes();
      var n = boxes.filter(function (el) { return el.checked; }).length;
      if (allMatching && allMatching.checked) {
        setText("pick-count", "All machines matching the filter are selected (" +
          allMatching.labels[0].textContent.replace(/[^0-9]/g, "") + ").");
      } else {
        setText("pick-count", n ? n + " selected." : "");
      }
      if (pickPage) {
        pickPage.checked = boxes.length > 0 && n === boxes.length;
        pickPage.indeterminate = n > 0 && n < boxes.length;
      }
    };
    if (pickPage) {
      pickPage.hidden = false;
      pickPage.addEventListener("change", function () {
        rowBoxes().forEach(function (el) { if (!el.disabled) { el.checked = pickPage.checked; } });
        countPicks();
      });
    }
    if (allMatching) {
      allMatching.addEventListener("change", function () {
        rowBoxes().forEach(function (el) {
          el.disabled = allMatching.checked;
          if (allMatching.checked) { el.checked = true; }
        });
        if (pickPage) { pickPage.disabled = allMatching.checked; }
        countPicks();
      });
    }
    batchForm.addEventListener("change", function (ev) { if (ev.target.name === "m") { countPicks(); } });
    batchForm.setAttribute("data-needs", "m all");
    batchForm.setAttribute("data-needs-status", "pick-count");
    batchForm.setAttribute("data-needs-message", "Tick machines first (or select all matching the filter).");
    countPicks();
  }

  // -- the queue page: "Cancel selected"
  var cancelMany = document.getElementById("cancel-selected");
  if (cancelMany) {
    cancelMany.setAttribute("data-needs", "job");
    cancelMany.setAttribute("data-needs-status", "cancel-count");
    cancelMany.setAttribute("data-needs-message", "Tick the jobs to cancel first.");
    document.addEventListener("change", function (ev) {
      if (ev.target.name !== "job") { return; }
      var n = checkedIn(cancelMany, ["job"]).length;
      setText("cancel-count", n ? n + " selected." : "Tick the jobs to cancel below.");
    });
  }

  // -- the batch page: progress, counts and members live over Server-Sent Events
  function setBadge(el, state) {
    if (!el) { return; }
    var badge = document.createElement("span");
    badge.className = "state state-" + state;
    badge.textContent = state.replace("_", " ");
    el.replaceChildren(badge);
  }

  var ACTIVE = ["pending", "queued", "running"];
  var batchBox = document.getElementById("batch");

  function applyBatch(b) {
    if (!b) { return; }
    setBadge(document.getElementById("batch-state"), b.state);
    var halt = document.getElementById("batch-halt");
    if (halt) { halt.textContent = b.halt_reason || ""; halt.hidden = !b.halt_reason; }
    var counts = b.counts || {};
    var done = b.total;
    Object.keys(counts).forEach(function (s) {
      if (ACTIVE.indexOf(s) >= 0) { done -= counts[s]; }
      var item = document.getElementById("count-" + s);
      if (item) {
        var strong = item.querySelector("strong");
        if (strong) { strong.textContent = String(counts[s]); }
        item.classList.toggle("zero", !counts[s]);
      }
    });
    var bar = document.getElementById("batch-progress");
    if (bar && b.total) { bar.max = b.total; bar.value = done; bar.textContent = Math.round(b.progress * 100) + "%"; }
    setText("batch-done", String(done));
    setText("batch-percent", Math.round(b.progress * 100) + "%");
    if (b.finished) { setTime("batch-finished", b.finished); }
    if (b.state !== "running") {
      var cancel = document.getElementById("batch-cancel");
      if (cancel) { cancel.remove(); }
    }
    document.title = document.title.replace(/\([a-z_]+\)/, "(" + b.state + ")");
  }

  function applyMember(mb) {
    var row = document.getElementById("member-" + mb.position);
    if (!row) { return; }
    setBadge(row.querySelector(".m-state"), mb.state);
    var jobCell = row.querySelector(".m-job");
    if (jobCell && mb.task_id) {
      var link = document.createElement("a");
      link.href = "/jobs/" + encodeURIComponent(mb.task_id);
      link.className = "nowrap";
      link.textContent = "…" + mb.task_id.slice(-8);
      var parts = [link];
      if (mb.joined) {
        var note = document.createElement("span");
        note.className = "muted";
        note.textContent = "(joined)";
        parts.push(document.createTextNode(" "), note);
      }
      jobCell.replaceChildren.apply(jobCell, parts);
    }
    var errorCell = row.querySelector(".m-error");
    if (errorCell) {
      if (mb.error) {
        var line = document.createElement("span");
        line.className = "error-line";
        line.textContent = mb.error.length > 165 ? mb.error.slice(0, 157) + "..." : mb.error;
        errorCell.replaceChildren(line);
      } else {
        errorCell.replaceChildren();
      }
    }
  }

  if (batchBox && batchBox.dataset.stream && window.EventSource) {
    var batchSource = new EventSource(batchBox.dataset.stream);
    batchSource.onopen = function () { setText("live-status", "Live: members update as they start and end."); };
    batchSource.onerror = function () {
      if (batchSource.readyState !== EventSource.CLOSED) { setText("live-status", "Connection lost; reconnecting…"); }
    };
    batchSource.onmessage = function (message) {
      var data;
      try { data = JSON.parse(message.data); } catch (e) { return; }
      if (!data.batch || data.batch.batch_id !== batchBox.dataset.batch) { return; }
      (data.members || []).forEach(applyMember);
      applyBatch(data.batch);
    };
    batchSource.addEventListener("end", function () {
      batchSource.close();
      var state = document.querySelector("#batch-state .state");
      setText("live-status", "Finished: " + (state ? state.textContent : "ended") + ".");
    });
  }

  // -- the queue page: say when it is out of date (no surprise reloads)
  var queueLive = document.getElementById("queue-live");
  if (queueLive && queueLive.dataset.stream && window.EventSource) {
    var queueSource = new EventSource(queueLive.dataset.stream);
    queueSource.onmessage = function () {
      queueLive.hidden = false;
      queueSource.close();
    };
  }

  // -- the fleet page: counts, pool strip and rows follow the job events without a reload.  On a state
  // change the page's own URL is fetched again and its live parts swapped in; the ticked checkboxes,
  // the focus and the scroll position stay.
  var fleet = document.getElementById("fleet");
  var LIVE_PARTS = ["fleet-counts", "pool-strip", "showing", "fleet-rows"];
  if (fleet && fleet.dataset.stream && window.EventSource && window.fetch && window.DOMParser) {
    var fleetSource = new EventSource(fleet.dataset.stream);
    var busy = false, again = false, settle = null;

    var swapIn = function (fresh) {
      var form = document.getElementById("batch-form");
      var ticked = {};
      if (form) {
        Array.prototype.forEach.call(form.elements, function (el) {
          if (el.name === "m" && el.checked) { ticked[el.value] = true; }
        });
      }
      var all = document.getElementById("all-matching");
      var focused = document.activeElement, focusKey = null;
      if (focused && focused.name === "m") { focusKey = focused.value; }
      var x = window.scrollX, y = window.scrollY;
      LIVE_PARTS.forEach(function (id) {
        var now = document.getElementById(id), next = fresh.getElementById(id);
        if (now && next) { now.replaceChildren.apply(now, Array.prototype.map.call(next.childNodes, function (n) {
          return document.importNode(n, true);
        })); }
      });
      if (form) {
        Array.prototype.forEach.call(form.elements, function (el) {
          if (el.name !== "m") { return; }
          if (all && all.checked) { el.checked = true; el.disabled = true; } else { el.checked = !!ticked[el.value]; }
          if (focusKey !== null && el.value === focusKey) { el.focus({ preventScroll: true }); }
        });
        var box = form.querySelector("input[name=m]");
        if (box) { box.dispatchEvent(new Event("change", { bubbles: true })); }  // the "n selected" line
      }
      window.scrollTo(x, y);
      fleet.setAttribute("data-refreshed", String((Number(fleet.getAttribute("data-refreshed")) || 0) + 1));
    };

    var refresh = function () {
      if (busy) { again = true; return; }
      busy = true;
      window.fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (text) {
          if (text) { swapIn(new DOMParser().parseFromString(text, "text/html")); }
        })
        .catch(function () { return null; })
        .then(function () {
          busy = false;
          if (again) { again = false; refresh(); }
        });
    };

    var soon = null;
    fleetSource.onmessage = function (message) {
      var data;
      try { data = JSON.parse(message.data); } catch (e) { return; }
      if (!data.job) { return; }
      // coalesce bursts; then once more after a quiet moment, when the counts' writes have landed
      if (soon === null) { soon = window.setTimeout(function () { soon = null; refresh(); }, 300); }
      if (settle !== null) { window.clearTimeout(settle); }
      settle = window.setTimeout(function () { settle = null; refresh(); }, 2500);
    };
    fleetSource.addEventListener("reset", function () { refresh(); });
  }
})();
