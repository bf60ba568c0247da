// devid console: the little script of the server-rendered pages. No inline script anywhere
// (CSP default-src 'self'); text from devices (payloads, topics, JSON keys) is only ever set
// with textContent, never as HTML.
(function () {
  'use strict';
  var page = document.body.dataset.page;

  function cell(tr, s, cls) {
    var c = document.createElement('td');
    c.textContent = s;
    if (cls) c.className = cls;
    tr.appendChild(c);
    return c;
  }

  function devices() {
    var filters = document.querySelectorAll('#filters select');
    for (var i = 0; i < filters.length; i++) {
      filters[i].addEventListener('change', function (ev) { ev.target.form.submit(); });
    }
    // navigation start -> table rendered (the script runs once the table is parsed)
    var t = performance.now();
    performance.mark('devices-table-rendered');
    document.body.dataset.renderedMs = t.toFixed(1);
  }

  // Numbers in a JSON payload: a bare number ("value"), or an object's numeric fields (one
  // level of nesting as "outer.inner").
  function numbers(text) {
    var v;
    try { v = JSON.parse(text); } catch (e) { return null; }
    var out = {}, n = 0;
    function put(k, x) {
      if (typeof x === 'number' && isFinite(x)) { out[k] = x; n++; }
    }
    if (typeof v === 'number') put('value', v);
    else if (v && typeof v === 'object' && !Array.isArray(v)) {
      Object.keys(v).forEach(function (k) {
        var x = v[k];
        if (x && typeof x === 'object' && !Array.isArray(x)) {
          Object.keys(x).forEach(function (k2) { put(k + '.' + k2, x[k2]); });
        } else put(k, x);
      });
    }
    return n ? out : null;
  }

  function device() {
    var el = document.getElementById('chart');
    var id = el.dataset.device;
    var tbody = document.querySelector('#messages tbody');
    var live = document.getElementById('live');
    var MAX_POINTS = 600, MAX_SERIES = 8, MAX_ROWS = 25;
    var COLORS = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#4d7c0f', '#be185d'];
    var keys = [], xs = [], cols = {}, seen = {}, plot = null;

    function draw(rebuild) {
      if (typeof uPlot === 'undefined' || !keys.length) return;
      var data = [xs].concat(keys.map(function (k) { return cols[k]; }));
      if (plot && !rebuild) { plot.setData(data); return; }
      if (plot) plot.destroy();
      var series = [{}].concat(keys.map(function (k, i) {
        return { label: k, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true };
      }));
      plot = new uPlot({
        width: Math.max(320, el.clientWidth || 900),
        height: 260,
        series: series,
        scales: { x: { time: true } }
      }, data, el);
    }

    function add(m) {
      if (seen[m.id]) return;
      seen[m.id] = true;
      var tr = document.createElement('tr');
      cell(tr, m.received_at);
      cell(tr, m.topic, 'mono topic');
      cell(tr, m.payload_encoding === 'utf8' ? m.payload : '(binary, base64) ' + m.payload, 'payload');
      tbody.insertBefore(tr, tbody.firstChild);
      while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
      document.body.dataset.messages = String((Number(document.body.dataset.messages) || 0) + 1);
      if (m.payload_encoding !== 'utf8') return;
      var nums = numbers(m.payload);
      if (!nums) return;
      var rebuild = false;
      Object.keys(nums).forEach(function (k) {
        if (!Object.prototype.hasOwnProperty.call(cols, k) && keys.length < MAX_SERIES) {
          keys.push(k);
          cols[k] = xs.map(function () { return null; });
          rebuild = true;
        }
      });
      xs.push(Date.parse(m.received_at) / 1000);
      keys.forEach(function (k) {
        cols[k].push(Object.prototype.hasOwnProperty.call(nums, k) ? nums[k] : null);
      });
      if (xs.length > MAX_POINTS) {
        xs.shift();
        keys.forEach(function (k) { cols[k].shift(); });
      }
      draw(rebuild);
      document.body.dataset.points = String(xs.length);
    }

    var base = '/console/devices/' + encodeURIComponent(id);
    fetch(base + '/messages.json', { credentials: 'same-origin' })
      .then(function (r) { return r.ok ? r.json() : []; })
      .then(function (list) { list.forEach(add); })
      .catch(function () {})
      .then(function () {
        var es = new EventSource(base + '/stream');
        es.addEventListener('open', function () {
          live.textContent = 'live';
          document.body.dataset.live = '1';
        });
        es.addEventListener('message', function (ev) {
          try { add(JSON.parse(ev.data)); } catch (e) { /* not a message */ }
        });
        es.addEventListener('error', function () { live.textContent = 'reconnecting…'; });
      });
  }

  function overview() {
    var prev = null;
    function set(id, s) { var e = document.getElementById(id); if (e) e.textContent = s; }
    function tick() {
      fetch('/console/overview.json', { credentials: 'same-origin' })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (o) {
          if (!o) return;
          set('m-connections', String(o.connections));
          set('m-messages', String(o.messages_total));
          if (prev && o.time_ms > prev.time_ms) {
            var dt = (o.time_ms - prev.time_ms) / 1000;
            set('m-connect-rate', ((o.connects_total - prev.connects_total) / dt).toFixed(2));
            set('m-message-rate', ((o.messages_total - prev.messages_total) / dt).toFixed(2));
          }
          var tb = document.querySelector('#refusals tbody');
          if (tb) {
            while (tb.firstChild) tb.removeChild(tb.firstChild);
            o.refusals.forEach(function (r) {
              var tr = document.createElement('tr');
              cell(tr, r.family); cell(tr, r.reason); cell(tr, String(r.count), 'num');
              tb.appendChild(tr);
            });
          }
          prev = o;
        })
        .catch(function () {});
    }
    tick();
    setInterval(tick, 2000);
  }

  if (page === 'devices') devices();
  else if (page === 'device') device();
  else if (page === 'overview') overview();
})();
