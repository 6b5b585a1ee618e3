"""The label page: the prompt and two candidates side by side, large; keys to answer; a counter. Never a score (it
would bias the labeller), never a file name or path (the page asks for pictures by candidate id).

Built on `report.page` (its header, escaping and Content-Security-Policy): the page's only script is its own (by
hash), it may fetch from its server only, and everything it shows from a prompt is set as text, never as HTML.
"""

from __future__ import annotations

from pickrank.report.page import HEADER_CSS, content_security_policy, page_head, page_script

CSS = HEADER_CSS.replace("var(--bg)", "#10141c").replace("var(--ink)", "#e8ecf3") + """
main{padding:12px 20px;max-width:1800px;margin:0 auto}
#prompt{font-size:20px;margin:6px 0 12px;min-height:1.4em;overflow-wrap:anywhere;white-space:pre-wrap}
.pair{display:flex;gap:14px}
.pair figure{flex:1;margin:0;background:#1b2130;border:3px solid #2a3244;border-radius:8px;display:flex;
align-items:center;justify-content:center;height:calc(100vh - 250px);min-height:240px;position:relative}
.pair figure.chosen{border-color:#4f9dff}
.pair img{max-width:100%;max-height:100%;object-fit:contain}
.pair figcaption{position:absolute;top:6px;left:10px;color:#8e99ad;font-size:13px}
.pair .broken{color:#e0a050;padding:20px}
.keys{color:#aab3c5;margin:12px 0 4px}.keys kbd{background:#2a3244;border-radius:4px;padding:1px 6px;color:#fff}
#count{color:#cfd6e4}#status{color:#e0a050;min-height:1.2em}
"""

# The page's behaviour. Keys -> an answer POSTed with the shown pair's id; the reply is the next state. The pair
# after it is fetched into the browser's cache at once, so the next pair shows without waiting for the server's
# pictures. data-* on <main> says what is shown (the browser tests and the latency benchmark read them).
JS = r"""
var main=d.querySelector("main"),prompt=d.getElementById("prompt"),count=d.getElementById("count"),
  status=d.getElementById("status"),figs=[d.getElementById("left"),d.getElementById("right")];
var cur=null,busy=false,t0=0,shown=0,held={};
var KEYS={"ArrowLeft":"left","1":"left","ArrowRight":"right","2":"right","ArrowDown":"tie","0":"tie"," ":"skip",
  "u":"undo","U":"undo","Backspace":"undo"};
function api(path,body){
  return fetch(path,{method:body?"POST":"GET",credentials:"same-origin",cache:"no-store",
    headers:body?{"Content-Type":"application/json"}:{},body:body?JSON.stringify(body):undefined})
  .then(function(r){return r.json().then(function(j){if(!r.ok)throw new Error(j.error||("HTTP "+r.status));return j;});});
}
function picture(id){
  var im=held[id];
  if(!im){im=new Image();im.alt="candidate";im.src="/img/"+id;held[id]=im;}
  return im;
}
function settle(im){
  return (im.decode?im.decode():Promise.resolve()).then(function(){return true;},function(){return false;});
}
function place(fig,im,ok,side){
  fig.textContent="";fig.classList.remove("chosen");
  var cap=d.createElement("figcaption");cap.textContent=side;fig.appendChild(cap);
  if(ok){fig.appendChild(im);}else{var p=d.createElement("p");p.className="broken";
    p.textContent="this image cannot be shown (press space to skip it)";fig.appendChild(p);}
}
function counts(s){
  count.textContent=s.labelled+" labelled ("+s.session+" this session) \u00b7 "+s.pairs+" pairs over "+s.prompts+
    " prompts"+(s.order==="uncertain"?" \u00b7 "+s.scored+" of "+s.prompts+" prompts scored":"");
  main.setAttribute("data-count",String(s.labelled));
}
function show(s){
  counts(s);status.textContent=s.note||"";
  var next=s.next;if(next){picture(next.left);picture(next.right);}
  if(!s.current){cur=null;prompt.textContent="Every pair is labelled. Thank you!";
    figs.forEach(function(f){f.textContent="";});main.setAttribute("data-pair","");return Promise.resolve();}
  cur=s.current;
  var L=picture(cur.left),R=picture(cur.right);
  return Promise.all([settle(L),settle(R)]).then(function(ok){
    if(!cur||cur.id!==s.current.id)return;
    prompt.textContent=cur.prompt;place(figs[0],L,ok[0],"left");place(figs[1],R,ok[1],"right");
    main.setAttribute("data-pair",String(cur.id));main.setAttribute("data-left",String(cur.left));
    main.setAttribute("data-right",String(cur.right));
    if(t0){main.setAttribute("data-ms",(performance.now()-t0).toFixed(2));t0=0;}
    shown+=1;main.setAttribute("data-shown",String(shown));
    Object.keys(held).forEach(function(k){k=Number(k);
      if(k!==cur.left&&k!==cur.right&&!(next&&(k===next.left||k===next.right)))delete held[k];});
  });
}
function fail(e){status.textContent=String(e.message||e);}
d.addEventListener("keydown",function(e){
  var what=KEYS[e.key];if(!what||e.ctrlKey||e.metaKey||e.altKey)return;
  e.preventDefault();if(busy)return;
  if(what!=="undo"&&!cur)return;
  busy=true;t0=performance.now();
  if(what==="left"||what==="right")figs[what==="left"?0:1].classList.add("chosen");
  var req=what==="undo"?api("/api/undo",{}):api("/api/answer",{pair:cur.id,answer:what});
  req.then(show).catch(fail).then(function(){busy=false;});
});
api("/api/state").then(show).catch(fail).then(function(){d.documentElement.setAttribute("data-ready","1");});
"""


def label_page(source: str, labeler: str, labels_file: str) -> tuple[str, str]:
    """The page's HTML, and the Content-Security-Policy to serve it with (pictures and requests: its server
    only)."""
    script = page_script(JS).replace('d.documentElement.setAttribute("data-ready","1");\n', "")
    policy = content_security_policy(script, images="'self'", connect="'self'") + "; frame-ancestors 'none'"
    items = [("source", source), ("labeller", labeler), ("labels", labels_file)]
    body = ('<main data-shown="0">\n<p id="prompt"></p>\n<div class="pair"><figure id="left"></figure>'
            '<figure id="right"></figure></div>\n<p class="keys"><kbd>\u2190</kbd> or <kbd>1</kbd> left is better '
            "\u00b7 <kbd>\u2192</kbd> or <kbd>2</kbd> right is better \u00b7 <kbd>\u2193</kbd> or <kbd>0</kbd> a tie "
            "\u00b7 <kbd>space</kbd> skip \u00b7 <kbd>u</kbd> or <kbd>\u232b</kbd> undo</p>\n"
            '<p id="count"></p>\n<p id="status" role="status"></p>\n</main>\n')
    html = (page_head("pickrank label", "which of the two is better for the prompt?", CSS, script, items, {},
                      policy=policy)
            + body + f"<script>{script}</script>\n</body>\n</html>\n")
    return html, policy


__all__ = ["CSS", "JS", "label_page"]
