// The console's words in Chinese (the staff's language) and English. The choice is
// remembered in localStorage; the first visit follows the browser's language.

const STORAGE_KEY = "eldersafe.lang";

const MESSAGES = {
  "zh-CN": {
    "app.title": "安心守护 · 值班台",
    "lang.other": "English",
    "login.title": "值班登录",
    "login.username": "工号",
    "login.password": "密码",
    "login.submit": "登录",
    "login.failed": "工号或密码不正确",
    "login.expired": "登录已过期，请重新登录",
    "login.network": "无法连接服务器，请稍后再试",
    "logout": "退出",
    "conn.live": "实时",
    "conn.connecting": "连接中…",
    "conn.offline": "已断开，正在重连…",
    "sound.blocked": "点此开启警报声",
    "sound.sounding": "警报声响中，接单后停止",
    "alerts.title": "实时警报",
    "alerts.empty": "目前没有未处理的警报",
    "alerts.open_count": "未处理 {n}",
    "district.title": "辖区概况",
    "district.unit": "单位",
    "district.open": "未结案",
    "district.unacknowledged": "待接单",
    "district.raised": "近{hours}小时警报",
    "district.ack": "60秒内接单",
    "district.ack_p50": "接单用时中位数",
    "district.scene": "15分钟内到场",
    "district.scene_p50": "到场用时中位数",
    "district.none": "—",
    "type.sos": "紧急呼叫",
    "type.fall": "跌倒",
    "type.smoke": "烟雾报警",
    "type.electrical": "电气火灾隐患",
    "type.vital_signs": "生命体征异常",
    "type.inactivity": "长时间无活动",
    "type.wandering": "走失越界",
    "type.device_offline": "设备离线",
    "type.low_battery": "电量不足",
    "type.tamper": "设备被摘除",
    "type.device_fault": "设备故障",
    "severity.critical": "危急",
    "severity.major": "重要",
    "severity.minor": "一般",
    "status.open": "待接单",
    "status.acknowledged": "已接单",
    "status.on_scene": "已到场",
    "status.resolved": "已结案",
    "outcome.handled": "已妥善处置",
    "outcome.false_alarm": "误报",
    "outcome.sent_to_hospital": "已送医",
    "outcome.cancelled_by_resident": "老人自行取消",
    "outcome.transferred": "已转交（119/120）",
    "outcome.cleared": "已自行恢复",
    "outcome.deceased": "老人已离世",
    "action.acknowledge": "接单",
    "action.on_scene": "已到场",
    "action.resolve": "结案",
    "action.pick_outcome": "选择处置结果",
    "action.failed": "操作未成功：{detail}",
    "action.conflict": "警报状态已变化，已更新",
    "action.gone": "该警报已不在您的范围内",
    "card.age": "{age}岁",
    "card.lives_alone": "独居",
    "card.conditions": "健康状况",
    "card.family": "家属",
    "card.phone": "电话",
    "card.site": "地点",
    "card.unit": "责任单位",
    "card.opened": "发生于 {time}",
    "card.repeated": "共触发 {n} 次",
    "card.level": "第 {level} 级",
    "card.next_escalation": "距下一级升级",
    "card.escalating": "正在升级",
    "card.next_step": "距下一步（提醒或升级）",
    "card.masked": "个人信息已脱敏（警报尚未升级至本级）",
    "card.no_resident": "未登记住户",
    "card.acknowledged_by": "接单人：{name}",
    "device.executed": "老人设备已显示“救援马上到”",
    "device.refused": "老人设备未执行提示：{outcome}",
    "device.unreachable": "老人设备暂时无法联系",
    "device.waiting": "正在通知老人设备…",
    "timeline.title": "处置时间线",
    "timeline.loading": "加载中…",
    "timeline.failed": "时间线加载失败",
    "audit.opened": "警报产生",
    "audit.repeated": "再次触发",
    "audit.source_added": "新增报警源",
    "audit.source_cleared": "报警源恢复",
    "audit.severity_raised": "级别提升",
    "audit.acknowledged": "接单",
    "audit.on_scene": "到场",
    "audit.resolved": "结案",
    "audit.reopened": "重新打开",
    "audit.escalated": "升级",
    "audit.reminded": "提醒",
    "audit.notified": "已送达",
    "audit.delivery_failed": "送达失败",
    "audit.noted": "记录",
    "channel.console": "值班台",
    "channel.messaging": "消息",
    "channel.voice": "语音电话",
    "channel.sms": "短信",
    "channel.webhook": "区平台",
    "channel.device": "设备",
    "channel.system": "系统",
    "actor.system": "系统",
    "actor.device": "老人设备",
    "timeline.to": "→ {who}",
    "timeline.level": "升至第 {level} 级",
    "timeline.device_confirmed": "设备已确认",
    "timeline.seen": "已在值班台看到",
    "duration.s": "{s}秒",
    "duration.ms": "{m}分{s}秒",
    "duration.hm": "{h}小时{m}分",
  },
  en: {
    "app.title": "eldersafe · duty console",
    "lang.other": "中文",
    "login.title": "Duty sign-in",
    "login.username": "Staff ID",
    "login.password": "Password",
    "login.submit": "Sign in",
    "login.failed": "Wrong staff ID or password",
    "login.expired": "Your session expired; please sign in again",
    "login.network": "Cannot reach the server; try again shortly",
    "logout": "Sign out",
    "conn.live": "Live",
    "conn.connecting": "Connecting…",
    "conn.offline": "Disconnected, reconnecting…",
    "sound.blocked": "Tap here to turn the alarm sound on",
    "sound.sounding": "Alarm sounding until acknowledged",
    "alerts.title": "Live alerts",
    "alerts.empty": "No open alerts",
    "alerts.open_count": "{n} open",
    "district.title": "District view",
    "district.unit": "Unit",
    "district.open": "Open",
    "district.unacknowledged": "Waiting",
    "district.raised": "Alerts, last {hours} h",
    "district.ack": "Acknowledged ≤ 60 s",
    "district.ack_p50": "Median to acknowledge",
    "district.scene": "On scene ≤ 15 min",
    "district.scene_p50": "Median to scene",
    "district.none": "—",
    "type.sos": "SOS call",
    "type.fall": "Fall",
    "type.smoke": "Smoke alarm",
    "type.electrical": "Electrical fire risk",
    "type.vital_signs": "Vital signs",
    "type.inactivity": "No activity",
    "type.wandering": "Left safe area",
    "type.device_offline": "Device offline",
    "type.low_battery": "Low battery",
    "type.tamper": "Device removed",
    "type.device_fault": "Device fault",
    "severity.critical": "Critical",
    "severity.major": "Major",
    "severity.minor": "Minor",
    "status.open": "Waiting",
    "status.acknowledged": "Acknowledged",
    "status.on_scene": "On scene",
    "status.resolved": "Resolved",
    "outcome.handled": "Handled",
    "outcome.false_alarm": "False alarm",
    "outcome.sent_to_hospital": "Sent to hospital",
    "outcome.cancelled_by_resident": "Cancelled by resident",
    "outcome.transferred": "Transferred (119/120)",
    "outcome.cleared": "Cleared by itself",
    "outcome.deceased": "Deceased",
    "action.acknowledge": "Acknowledge",
    "action.on_scene": "On scene",
    "action.resolve": "Resolve",
    "action.pick_outcome": "Choose outcome",
    "action.failed": "Not done: {detail}",
    "action.conflict": "The alert changed meanwhile; updated",
    "action.gone": "This alert is no longer yours to see",
    "card.age": "{age} y",
    "card.lives_alone": "Lives alone",
    "card.conditions": "Conditions",
    "card.family": "Family",
    "card.phone": "Phone",
    "card.site": "Site",
    "card.unit": "Unit",
    "card.opened": "Since {time}",
    "card.repeated": "{n} times",
    "card.level": "Level {level}",
    "card.next_escalation": "Escalates in",
    "card.escalating": "Escalating",
    "card.next_step": "Next reminder or escalation in",
    "card.masked": "Personal details masked (not escalated to your level)",
    "card.no_resident": "No resident on file",
    "card.acknowledged_by": "Acknowledged by {name}",
    "device.executed": "Resident's device showed “help is coming”",
    "device.refused": "Resident's device did not show it: {outcome}",
    "device.unreachable": "Resident's device unreachable",
    "device.waiting": "Telling the resident's device…",
    "timeline.title": "Timeline",
    "timeline.loading": "Loading…",
    "timeline.failed": "Could not load the timeline",
    "audit.opened": "Raised",
    "audit.repeated": "Repeated",
    "audit.source_added": "Source added",
    "audit.source_cleared": "Source cleared",
    "audit.severity_raised": "Severity raised",
    "audit.acknowledged": "Acknowledged",
    "audit.on_scene": "On scene",
    "audit.resolved": "Resolved",
    "audit.reopened": "Reopened",
    "audit.escalated": "Escalated",
    "audit.reminded": "Reminder",
    "audit.notified": "Delivered",
    "audit.delivery_failed": "Delivery failed",
    "audit.noted": "Noted",
    "channel.console": "console",
    "channel.messaging": "message",
    "channel.voice": "voice call",
    "channel.sms": "SMS",
    "channel.webhook": "district platform",
    "channel.device": "device",
    "channel.system": "system",
    "actor.system": "System",
    "actor.device": "Resident's device",
    "timeline.to": "→ {who}",
    "timeline.level": "to level {level}",
    "timeline.device_confirmed": "device confirmed",
    "timeline.seen": "seen on the console",
    "duration.s": "{s} s",
    "duration.ms": "{m} min {s} s",
    "duration.hm": "{h} h {m} min",
  },
};

export const LANGUAGES = Object.keys(MESSAGES);

function initialLanguage() {
  let stored = null;
  try {
    stored = localStorage.getItem(STORAGE_KEY);
  } catch {
    // storage disabled (private mode): follow the browser
  }
  if (stored && stored in MESSAGES) return stored;
  const wanted = navigator.languages?.length ? navigator.languages : [navigator.language];
  return wanted.some((l) => String(l).toLowerCase().startsWith("zh")) ? "zh-CN" : "en";
}

let current = initialLanguage();
const listeners = [];

export function language() {
  return current;
}

/** The text for `key` with `{name}` placeholders filled; English, then the key, as fallbacks. */
export function t(key, params = {}) {
  const text = MESSAGES[current][key] ?? MESSAGES.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in params ? String(params[name]) : whole));
}

/** Whether a translation exists (unknown values from the server are shown as they are). */
export function has(key) {
  return key in MESSAGES[current] || key in MESSAGES.en;
}

export function translatePage(root = document) {
  document.documentElement.lang = current;
  document.title = t("app.title");
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  }
}

export function setLanguage(lang) {
  if (!(lang in MESSAGES)) return;
  current = lang;
  try {
    localStorage.setItem(STORAGE_KEY, lang);
  } catch {
    // not remembered; still switched for this page
  }
  translatePage();
  for (const listener of listeners) listener(lang);
}

export function onLanguageChange(listener) {
  listeners.push(listener);
}

export function toggleLanguage() {
  setLanguage(current === "zh-CN" ? "en" : "zh-CN");
}

/** "1分05秒" / "1 min 05 s": seconds as staff read a stopwatch. */
export function formatDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return t("duration.s", { s });
  if (s < 3600) return t("duration.ms", { m: Math.floor(s / 60), s: String(s % 60).padStart(2, "0") });
  return t("duration.hm", { h: Math.floor(s / 3600), m: String(Math.floor((s % 3600) / 60)).padStart(2, "0") });
}

export function formatTime(iso) {
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return "";
  const sameDay = new Date().toDateString() === at.toDateString();
  const options = sameDay
    ? { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false }
    : { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", hour12: false };
  return new Intl.DateTimeFormat(current, options).format(at);
}
